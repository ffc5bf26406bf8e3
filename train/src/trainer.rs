//! MAE pretraining with candle autograd.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::adamw::{self, AdamW};
use crate_mae::{checkpoint, init, CrateMae, CrateMaeConfig, Mask};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::Split;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Recipe {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate (after warm-up).
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_epochs: f64,
    pub weight_decay: f64,
    pub mask_ratio: f32,
    pub seed: u64,
    pub validation_images: usize,
    pub horizontal_flip: bool,
    /// The weights this run started from (`--init-from`: a further stage of training for a
    /// finished model), or none for the official initialisation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<String>,
}

/// What `train` writes next to the weights, and reads back on `--resume`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainLog {
    pub epochs_done: usize,
    pub steps_done: usize,
    pub seconds: f64,
    /// Per epoch: (mean training loss, validation loss).
    pub history: Vec<(f64, f64)>,
    /// The machine it trained on ([`hardware`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hardware: Option<String>,
}

/// The CPU's model name and core count, for the log and the model card.
pub fn hardware() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{cpu}, {cores} cores, no GPU")
}

/// The optimizer's moments and step, beside the checkpoint (what `--resume` continues with).
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Learning rate at `step`: linear warm-up, then cosine decay to `min_lr` (the MAE schedule).
pub fn learning_rate(r: &Recipe, step: usize, steps_per_epoch: usize) -> f64 {
    let epoch = step as f64 / steps_per_epoch as f64;
    if epoch < r.warmup_epochs {
        r.lr * epoch / r.warmup_epochs
    } else {
        let progress = (epoch - r.warmup_epochs) / (r.epochs as f64 - r.warmup_epochs).max(1e-9);
        r.min_lr
            + (r.lr - r.min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
    }
}

/// Biases, norms, tokens and position tables get no weight decay (as in MAE).
fn decays(name: &str, rank: usize) -> bool {
    rank >= 2 && !name.ends_with("_token") && !name.contains("pos_embed")
}

pub struct Trainer {
    pub cfg: CrateMaeConfig,
    pub recipe: Recipe,
    pub out: PathBuf,
    varmap: VarMap,
    model: CrateMae,
    decay: AdamW,
    no_decay: AdamW,
    device: Device,
    pub log: TrainLog,
}

impl Trainer {
    /// The last checkpoint in `out` when resuming; otherwise `start`'s weights (a new run
    /// that continues training another model, with its own schedule and fresh moments) or
    /// fresh ones with the official initialisation.
    pub fn new(
        cfg: CrateMaeConfig,
        recipe: Recipe,
        out: &Path,
        resume: bool,
        start: Option<&Path>,
        device: &Device,
    ) -> Result<Self> {
        std::fs::create_dir_all(out)?;
        let ckpt = out.join("checkpoint.safetensors");
        let resuming = resume && ckpt.exists();
        let (weights, log) = if resuming {
            let raw = checkpoint::read_weights(&ckpt, device)?;
            let log: TrainLog =
                serde_json::from_str(&std::fs::read_to_string(out.join("train_log.json"))?)?;
            (raw.tensors, log)
        } else if let Some(start) = start {
            let raw = checkpoint::read_weights(start, device)?;
            if let Some(theirs) = &raw.embedded_config {
                anyhow::ensure!(
                    theirs.parameter_count() == cfg.parameter_count()
                        && theirs.dim == cfg.dim
                        && theirs.depth == cfg.depth,
                    "{} is a d{} depth-{} model; this run is d{} depth {}",
                    start.display(),
                    theirs.dim,
                    theirs.depth,
                    cfg.dim,
                    cfg.depth
                );
            }
            (raw.tensors, TrainLog::default())
        } else {
            (
                init::random_weights(&cfg, recipe.seed, device)?,
                TrainLog::default(),
            )
        };
        let varmap = VarMap::new();
        let (mut decay, mut no_decay) = (Vec::new(), Vec::new());
        {
            let mut data = varmap.data().lock().expect("fresh varmap");
            for (name, tensor) in &weights {
                let var = Var::from_tensor(tensor)?;
                // The sin-cos tables are fixed: never handed to an optimizer.
                if !name.contains("pos_embed") {
                    if decays(name, tensor.rank()) {
                        &mut decay
                    } else {
                        &mut no_decay
                    }
                    .push((name.clone(), var.clone()));
                }
                data.insert(name.clone(), var);
            }
        }
        let model = CrateMae::new(&cfg, VarBuilder::from_varmap(&varmap, DType::F32, device))?;
        let params = |weight_decay| adamw::Params {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
        };
        let mut decay = AdamW::new(decay, params(recipe.weight_decay))?;
        let mut no_decay = AdamW::new(no_decay, params(0.0))?;
        let moments = out.join(OPTIMIZER_FILE);
        if resuming {
            if moments.exists() {
                let state = candle_core::safetensors::load(&moments, device)?;
                decay
                    .restore(&state, "decay")
                    .context("resuming the optimizer")?;
                no_decay
                    .restore(&state, "no_decay")
                    .context("resuming the optimizer")?;
            } else {
                eprintln!(
                    "warning: no {OPTIMIZER_FILE} in {}: the optimizer's moments restart at zero",
                    out.display()
                );
            }
        }
        Ok(Self {
            decay,
            no_decay,
            cfg,
            recipe,
            out: out.to_path_buf(),
            varmap,
            model,
            device: device.clone(),
            log,
        })
    }

    pub fn weights(&self) -> HashMap<String, Tensor> {
        let data = self.varmap.data().lock().expect("varmap");
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect()
    }

    fn save(&self, name: &str) -> Result<()> {
        checkpoint::save_safetensors(
            &self.weights(),
            &self.cfg,
            Default::default(),
            &self.out.join(name),
        )?;
        let mut state = self.decay.state("decay")?;
        state.extend(self.no_decay.state("no_decay")?);
        candle_core::safetensors::save(&state, self.out.join(OPTIMIZER_FILE))?;
        std::fs::write(
            self.out.join("train_log.json"),
            serde_json::to_string_pretty(&self.log)?,
        )?;
        Ok(())
    }

    /// The MAE objective for one batch: hide, encode, decode, MSE on the hidden patches.
    fn masked_loss(&self, x: &Tensor, mask: &Mask) -> Result<Tensor> {
        let latent = self.model.encode(x, Some(mask))?;
        let pred = self.model.decode(&latent)?;
        let mask = mask.to_tensor(&self.device)?;
        Ok(self.model.loss(x, &pred, &mask, self.cfg.norm_pix_loss)?)
    }

    /// Mean masked-patch loss on `split` with fixed masks (no gradient).
    pub fn evaluate(&self, split: &Split) -> Result<f64> {
        let norm = (self.cfg.mean[0], self.cfg.std[0]);
        let (mut sum, mut n) = (0.0, 0);
        let indices: Vec<usize> = (0..split.len()).collect();
        for (b, chunk) in indices.chunks(256).enumerate() {
            let x = split.batch(chunk, None, norm, &self.device)?;
            let mask = Mask::random(
                chunk.len(),
                self.cfg.num_patches(),
                self.recipe.mask_ratio,
                1_000_000 + b as u64,
            )?;
            let loss = self.masked_loss(&x, &mask)?;
            sum += loss.detach().to_scalar::<f32>()? as f64 * chunk.len() as f64;
            n += chunk.len();
        }
        Ok(sum / n.max(1) as f64)
    }

    /// Runs at most `chunk` of the remaining epochs (all with `None`), checkpointing after
    /// each; `model.safetensors` is written once the recipe's last epoch is done. A later
    /// `--resume` continues exactly where this stopped.
    pub fn run_chunk(&mut self, train: &Split, val: &Split, chunk: Option<usize>) -> Result<()> {
        let r = self.recipe.clone();
        let steps_per_epoch = train.len() / r.batch_size;
        anyhow::ensure!(
            steps_per_epoch > 0,
            "fewer training images ({}) than one batch ({})",
            train.len(),
            r.batch_size
        );
        let norm = (self.cfg.mean[0], self.cfg.std[0]);
        let total = (r.epochs * steps_per_epoch) as u64;
        let bar = ProgressBar::new(total).with_position(self.log.steps_done as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {pos}/{len} steps, ETA {eta} {msg}",
            )
            .expect("valid template"),
        );
        let started = Instant::now();
        let seconds_before = self.log.seconds;
        let last = chunk.map_or(r.epochs, |c| (self.log.epochs_done + c).min(r.epochs));
        for epoch in self.log.epochs_done..last {
            let mut rng = ChaCha8Rng::seed_from_u64(r.seed.wrapping_add(epoch as u64));
            let mut order: Vec<usize> = (0..train.len()).collect();
            order.shuffle(&mut rng);
            let (mut loss_sum, mut ema) = (0.0, f64::NAN);
            let epoch_start = Instant::now();
            for (i, batch) in order.chunks_exact(r.batch_size).enumerate() {
                let step = epoch * steps_per_epoch + i;
                let lr = learning_rate(&r, step, steps_per_epoch);
                let flips = r
                    .horizontal_flip
                    .then(|| Split::flips(batch.len(), &mut rng));
                let x = train.batch(batch, flips.as_deref(), norm, &self.device)?;
                let mask = Mask::random(
                    batch.len(),
                    self.cfg.num_patches(),
                    r.mask_ratio,
                    r.seed ^ (step as u64).wrapping_mul(0x9E37_79B9),
                )?;
                let loss = self.masked_loss(&x, &mask)?;
                let grads = loss.backward()?;
                self.decay.step(&grads, lr)?;
                self.no_decay.step(&grads, lr)?;
                let l = loss.to_scalar::<f32>()? as f64;
                anyhow::ensure!(l.is_finite(), "loss became {l} at step {step}");
                loss_sum += l;
                ema = if ema.is_nan() {
                    l
                } else {
                    0.98 * ema + 0.02 * l
                };
                let ips = ((i + 1) * r.batch_size) as f64 / epoch_start.elapsed().as_secs_f64();
                bar.set_message(format!(
                    "epoch {}/{} loss {ema:.4} lr {lr:.2e} {ips:.0} img/s",
                    epoch + 1,
                    r.epochs
                ));
                bar.inc(1);
                self.log.steps_done = step + 1;
            }
            let val_loss = self.evaluate(val)?;
            self.log
                .history
                .push((loss_sum / steps_per_epoch as f64, val_loss));
            self.log.epochs_done = epoch + 1;
            self.log.seconds = seconds_before + started.elapsed().as_secs_f64();
            self.log.hardware = Some(hardware());
            let line = format!(
                "epoch {:>3}: train loss {:.4}, validation loss {val_loss:.4} ({:.0} s)",
                epoch + 1,
                loss_sum / steps_per_epoch as f64,
                epoch_start.elapsed().as_secs_f64()
            );
            // A hidden bar (output not a terminal) swallows its println.
            if bar.is_hidden() {
                println!("{line}");
            } else {
                bar.println(line);
            }
            self.save("checkpoint.safetensors")
                .context("saving the checkpoint")?;
        }
        bar.finish_and_clear();
        if self.log.epochs_done == r.epochs {
            self.save("model.safetensors")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe() -> Recipe {
        Recipe {
            epochs: 10,
            batch_size: 8,
            lr: 1e-3,
            min_lr: 1e-5,
            warmup_epochs: 2.0,
            weight_decay: 0.05,
            mask_ratio: 0.75,
            seed: 0,
            validation_images: 0,
            horizontal_flip: true,
            init_from: None,
        }
    }

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let r = recipe();
        assert_eq!(learning_rate(&r, 0, 100), 0.0);
        assert!((learning_rate(&r, 100, 100) - 5e-4).abs() < 1e-12);
        assert!((learning_rate(&r, 200, 100) - 1e-3).abs() < 1e-12);
        assert!((learning_rate(&r, 1000, 100) - 1e-5).abs() < 1e-12);
        assert!(learning_rate(&r, 600, 100) < learning_rate(&r, 400, 100));
    }

    /// A few epochs on the committed fixture subset: the validation loss falls, and the
    /// checkpoint loads through the server's normal loader with its configuration and
    /// normalisation embedded.
    #[test]
    fn training_learns_and_its_checkpoint_serves() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut train = Split::load(&fixtures, "train").unwrap();
        let val = train.split_off(64);
        let (mean, std) = train.stats();
        let cfg = CrateMaeConfig {
            img_size: 32,
            patch_size: 4,
            dim: 32,
            depth: 2,
            heads: 2,
            decoder_depth: 2,
            decoder_num_heads: 2,
            mean: [mean; 3],
            std: [std; 3],
            ..CrateMaeConfig::tiny()
        };
        let out = std::env::temp_dir().join(format!("crate-mae-train-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let recipe = Recipe {
            epochs: 3,
            batch_size: 32,
            warmup_epochs: 0.5,
            ..recipe()
        };
        let mut trainer =
            Trainer::new(cfg.clone(), recipe.clone(), &out, false, None, &Device::Cpu).unwrap();
        let before = trainer.evaluate(&val).unwrap();
        trainer.run_chunk(&train, &val, None).unwrap();
        let after = trainer.evaluate(&val).unwrap();
        assert!(after < 0.95 * before, "validation loss {before} → {after}");
        assert_eq!(trainer.log.epochs_done, 3);
        let (served, _) = checkpoint::load(
            &out.join("model.safetensors"),
            &Default::default(),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(served.config(), &cfg);
        // Resuming at the end trains nothing more and keeps the log.
        let resumed = Trainer::new(cfg, recipe, &out, true, None, &Device::Cpu).unwrap();
        assert_eq!(resumed.log.epochs_done, 3);
        let _ = std::fs::remove_dir_all(&out);
    }

    /// A run stopped after an epoch and resumed (weights, the optimizer's moments and step, the
    /// log) ends bit-identical to the same run uninterrupted; resuming without the moments
    /// does not.
    #[test]
    fn a_resumed_run_is_the_run_it_continues() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut train = Split::load(&fixtures, "train").unwrap();
        train.truncate(96);
        let val = train.split_off(64);
        let cfg = CrateMaeConfig {
            img_size: 32,
            patch_size: 8,
            dim: 32,
            depth: 1,
            heads: 2,
            decoder_depth: 1,
            decoder_num_heads: 2,
            ..CrateMaeConfig::tiny()
        };
        let recipe = Recipe {
            epochs: 2,
            batch_size: 16,
            warmup_epochs: 0.5,
            ..recipe()
        };
        let dir = |tag: &str| {
            let d =
                std::env::temp_dir().join(format!("crate-mae-resume-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            d
        };
        let run = |out: &Path, chunks: &[usize], drop_moments: bool| {
            for (i, &c) in chunks.iter().enumerate() {
                if i > 0 && drop_moments {
                    std::fs::remove_file(out.join(OPTIMIZER_FILE)).unwrap();
                }
                let mut t =
                    Trainer::new(cfg.clone(), recipe.clone(), out, i > 0, None, &Device::Cpu)
                        .unwrap();
                t.run_chunk(&train, &val, Some(c)).unwrap();
            }
            let t =
                Trainer::new(cfg.clone(), recipe.clone(), out, true, None, &Device::Cpu).unwrap();
            assert_eq!(t.log.epochs_done, 2);
            t.weights()
        };
        let (whole, halves, forgetful) = (dir("whole"), dir("halves"), dir("forgetful"));
        let a = run(&whole, &[2], false);
        let b = run(&halves, &[1, 1], false);
        let c = run(&forgetful, &[1, 1], true);
        let differs = |x: &HashMap<String, Tensor>, y: &HashMap<String, Tensor>| {
            x.iter().any(|(k, t)| {
                let (t, u) = (t.flatten_all().unwrap(), y[k].flatten_all().unwrap());
                t.to_vec1::<f32>().unwrap() != u.to_vec1::<f32>().unwrap()
            })
        };
        assert!(
            !differs(&a, &b),
            "the resumed run differs from the uninterrupted one"
        );
        assert!(
            differs(&a, &c),
            "without its moments a resumed run should differ"
        );
        assert!(halves.join("model.safetensors").exists());
        for d in [whole, halves, forgetful] {
            let _ = std::fs::remove_dir_all(d);
        }
    }

    /// Same seed, same data: bit-identical weights; another seed: different weights.
    #[test]
    fn training_is_reproducible_from_its_seed() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let mut train = Split::load(&fixtures, "train").unwrap();
        train.truncate(96);
        let val = train.split_off(32);
        let cfg = CrateMaeConfig {
            img_size: 32,
            patch_size: 8,
            dim: 16,
            depth: 1,
            heads: 2,
            decoder_depth: 1,
            decoder_num_heads: 2,
            ..CrateMaeConfig::tiny()
        };
        let weights_after_training = |seed: u64, tag: &str| {
            let out = std::env::temp_dir()
                .join(format!("crate-mae-train-seed-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&out);
            let recipe = Recipe {
                epochs: 2,
                seed,
                ..recipe()
            };
            let mut trainer =
                Trainer::new(cfg.clone(), recipe, &out, false, None, &Device::Cpu).unwrap();
            trainer.run_chunk(&train, &val, None).unwrap();
            let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
            let _ = std::fs::remove_dir_all(&out);
            bytes
        };
        let first = weights_after_training(7, "a");
        assert!(
            first == weights_after_training(7, "b"),
            "same seed, different weights"
        );
        assert!(
            first != weights_after_training(8, "c"),
            "the seed changed nothing"
        );
    }

    #[test]
    fn weight_decay_skips_biases_norms_tokens_and_tables() {
        assert!(decays("blocks.0.layers.0.1.fn.weight", 2));
        assert!(decays("patch_embed.proj.weight", 4));
        assert!(!decays("blocks.0.layers.0.0.norm.weight", 1));
        assert!(!decays("decoder_pred.bias", 1));
        assert!(!decays("cls_token", 3));
        assert!(!decays("decoder_pos_embed", 3));
    }
}
