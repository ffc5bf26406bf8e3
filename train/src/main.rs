//! `crate-mae-train`: pretrain CRATE-MAE on Fashion-MNIST (`train`) and evaluate the frozen
//! encoder (`eval`, which also writes the model card).
//!
//! ```sh
//! apt-get install dataset-fashion-mnist
//! cargo run --release -p crate-mae-train -- train --out runs/fmnist
//! cargo run --release -p crate-mae-train -- eval --weights runs/fmnist/model.safetensors
//! ```

mod adamw;
mod data;
mod eval;
mod trainer;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::Device;
use candle_core::Tensor;
use clap::{Args, Parser, Subcommand};
use crate_mae::{checkpoint, CrateMaeConfig, LoadOptions, Pooling, WhitenedGrid, WhitenedGridSpec};
use serde_json::json;

use data::Split;
use trainer::{Recipe, Trainer};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "Pretrain and evaluate CRATE-MAE on Fashion-MNIST")]
struct Cli {
    /// Compute threads. Training tensors are small, and candle synchronises its threads on
    /// every elementwise op: on 2 cores one thread trained 1.65× faster than two (measured
    /// 27.3 s vs 16.5 s for 8 steps of d128/depth 4, batch 128).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// MAE pretraining; resumable, checkpoints every epoch.
    Train(TrainArgs),
    /// Frozen-encoder evaluation on the test split; writes eval.json and the model card.
    Eval(EvalArgs),
    /// Writes the first test images of each class as 32×32 PNGs, as the model sees them
    /// (the README picture and the server's fixtures).
    Samples(SamplesArgs),
}

#[derive(Args)]
struct DataArgs {
    /// Directory with the four Fashion-MNIST IDX .gz files.
    #[arg(long, default_value = data::DEFAULT_DIR)]
    data: PathBuf,
    /// Use only the first N training images (smoke runs).
    #[arg(long)]
    limit_train: Option<usize>,
    /// Use only the first N test images.
    #[arg(long)]
    limit_test: Option<usize>,
}

/// The defaults are the recipe of the server's built-in model (`server/assets/default-model`).
#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    data: DataArgs,
    #[arg(long, default_value = "runs/fmnist")]
    out: PathBuf,
    /// Continue the run in `--out` from its last checkpoint (weights, the optimizer's moments
    /// and step, the log): the resumed run is the run it continues.
    #[arg(long)]
    resume: bool,
    /// Train at most this many epochs now, then stop with a checkpoint (resume later with
    /// `--resume`): long recipes in chunks on a shared machine.
    #[arg(long)]
    chunk_epochs: Option<usize>,
    #[arg(long, default_value_t = 4)]
    patch_size: usize,
    #[arg(long, default_value_t = 128)]
    dim: usize,
    #[arg(long, default_value_t = 4)]
    depth: usize,
    #[arg(long, default_value_t = 4)]
    heads: usize,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    #[arg(long, default_value_t = 1e-3)]
    lr: f64,
    #[arg(long, default_value_t = 1e-5)]
    min_lr: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup_epochs: f64,
    #[arg(long, default_value_t = 0.05)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0.75)]
    mask_ratio: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training images held out for validation (never the test split).
    #[arg(long, default_value_t = 5000)]
    validation_images: usize,
    #[arg(long)]
    no_flip: bool,
    /// Start from these weights instead of the official initialisation: a further stage of
    /// training for a finished model, with this recipe's own schedule and fresh optimizer
    /// moments (the architecture flags must describe the same model).
    #[arg(long)]
    init_from: Option<PathBuf>,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    data: DataArgs,
    #[arg(long)]
    weights: PathBuf,
    /// Also evaluate raw pixels with the same probes (the baseline to beat).
    #[arg(long)]
    pixel_baseline: bool,
    /// Markdown appended to the model card (how the run went: interruptions, resumes).
    #[arg(long)]
    notes: Option<PathBuf>,
    /// Also write the weights here as safetensors with the configuration and the recommended
    /// pooling embedded: the server then uses that pooling when a request leaves it unset.
    #[arg(long)]
    export: Option<PathBuf>,
}

#[derive(Args)]
struct SamplesArgs {
    #[command(flatten)]
    data: DataArgs,
    #[arg(long)]
    out: PathBuf,
    /// Images per class.
    #[arg(long, default_value_t = 1)]
    per_class: usize,
}

fn load_splits(args: &DataArgs) -> Result<(Split, Split)> {
    let mut train = Split::load(&args.data, "train")?;
    let mut test = Split::load(&args.data, "t10k")?;
    if let Some(n) = args.limit_train {
        train.truncate(n);
    }
    if let Some(n) = args.limit_test {
        test.truncate(n);
    }
    Ok((train, test))
}

fn train(args: TrainArgs) -> Result<()> {
    let device = Device::Cpu;
    let (mut train, _) = load_splits(&args.data)?;
    let val = train.split_off(args.validation_images.min(train.len() / 5));
    let (mean, std) = train.stats();
    let cfg = CrateMaeConfig {
        img_size: data::SIDE,
        patch_size: args.patch_size,
        dim: args.dim,
        depth: args.depth,
        heads: args.heads,
        decoder_depth: args.depth,
        decoder_num_heads: args.heads,
        mean: [mean; 3],
        std: [std; 3],
        ..CrateMaeConfig::tiny()
    };
    let recipe = Recipe {
        epochs: args.epochs,
        batch_size: args.batch_size,
        lr: args.lr,
        min_lr: args.min_lr,
        warmup_epochs: args.warmup_epochs,
        weight_decay: args.weight_decay,
        mask_ratio: args.mask_ratio,
        seed: args.seed,
        validation_images: val.len(),
        horizontal_flip: !args.no_flip,
        init_from: args.init_from.as_ref().map(|p| p.display().to_string()),
    };
    println!(
        "CRATE-MAE d{} depth {} heads {} patch {} ({:.2} M parameters); {} train / {} validation images; normalisation mean {mean:.4} std {std:.4}",
        cfg.dim, cfg.depth, cfg.heads, cfg.patch_size, cfg.parameter_count() as f64 / 1e6, train.len(), val.len()
    );
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(
        args.out.join("recipe.json"),
        serde_json::to_string_pretty(&json!({"config": cfg, "recipe": recipe}))?,
    )?;
    let mut trainer = Trainer::new(
        cfg,
        recipe,
        &args.out,
        args.resume,
        args.init_from.as_deref(),
        &device,
    )?;
    trainer.run_chunk(&train, &val, args.chunk_epochs)?;
    if trainer.log.epochs_done < trainer.recipe.epochs {
        println!(
            "stopped after epoch {} of {}: continue with the same command and --resume",
            trainer.log.epochs_done, trainer.recipe.epochs
        );
    } else {
        println!("wrote {}", args.out.join("model.safetensors").display());
    }
    Ok(())
}

fn eval(args: EvalArgs) -> Result<()> {
    let device = Device::Cpu;
    let (model, info) = checkpoint::load(&args.weights, &LoadOptions::default(), &device)?;
    let cfg = model.config().clone();
    let (train, test) = load_splits(&args.data)?;
    let val = (train.len() / 6).max(1);
    let started = std::time::Instant::now();
    let train_readouts = eval::readouts(&model, &train, &device)?;
    let test_readouts = eval::readouts(&model, &test, &device)?;
    // Readouts are chosen on validation rows carved from train, never on the test split: the
    // last sixth of train is the queries (of k-NN) and the held-out rows (of the linear
    // probe), the rest the gallery, the probe's training rows and the rows every whitening
    // is fitted on.
    let n = train.len();
    let fit_rows = n - val.min(n / 2);
    let validation_knn20 = |train_features: &eval::Features| -> Result<f64> {
        Ok(eval::knn(
            &train_features.slice(0..fit_rows),
            &train.labels[..fit_rows],
            &train_features.slice(fit_rows..n),
            &train.labels[fit_rows..],
            &[20],
        )?[0])
    };
    let mut validation = serde_json::Map::new();
    // The linear probe on validation, for what Embed can serve unasked.
    let mut validation_probe = serde_json::Map::new();
    let mut probe_validation = |name: &str, features: &eval::Features| -> Result<()> {
        let (acc, _) = eval::softmax_validation(features, &train.labels, fit_rows)?;
        println!("validation probe  {name:>24}: {:.2} %", acc * 100.0);
        validation_probe.insert(name.to_string(), json!(acc));
        Ok(())
    };
    for r in &train_readouts {
        let acc = validation_knn20(&r.features)?;
        println!("validation 20-NN {:>24}: {:.2} %", r.name, acc * 100.0);
        validation.insert(r.name.clone(), json!(acc));
        if SERVED_POOLED
            .iter()
            .any(|p| r.name == ServedReadout::Pooled(*p).name())
        {
            probe_validation(&r.name, &r.features)?;
        }
    }
    // Whitened grids of each block's output, and of neighbouring blocks' outputs
    // concatenated, at a few widths.
    let mut whitened = Vec::new();
    for (spec, widths) in whitening_candidates(cfg.depth) {
        let pooled = grid_features(&train_readouts, spec)?;
        let pca = eval::Pca::fit(&pooled, 0..fit_rows)?;
        for &k in widths {
            let (mean, projection) = pca.whitening(k);
            let features = eval::whiten(&pooled, &mean, &projection)?;
            let acc = validation_knn20(&features)?;
            let candidate = Whitening { spec, k };
            let name = candidate.name();
            println!("validation 20-NN {name:>24}: {:.2} %", acc * 100.0);
            probe_validation(&name, &features)?;
            validation.insert(name, json!(acc));
            whitened.push(candidate);
        }
    }
    let accuracy = |name: &str| {
        validation
            .get(name)
            .and_then(|v| v.as_f64())
            .unwrap_or(f64::NEG_INFINITY)
    };
    let selected = validation
        .keys()
        .max_by(|a, b| accuracy(a).total_cmp(&accuracy(b)))
        .context("no readouts")?
        .clone();
    // What Embed serves unasked is scored on both of the project's targets: the mean of
    // validation 20-NN and validation linear-probe accuracy.
    let served_score = |name: &str| {
        let probe = validation_probe.get(name).and_then(|v| v.as_f64());
        probe.map_or(f64::NEG_INFINITY, |p| (accuracy(name) + p) / 2.0)
    };
    let served = ServedReadout::choose(&whitened, served_score);
    println!(
        "served by default (mean of validation 20-NN and linear probe, of what Embed can serve unasked): {}",
        served.name()
    );
    // The served whitening is refitted on every training image.
    let whitening = match served {
        ServedReadout::Whitened(w) => {
            Some(eval::Pca::fit(&grid_features(&train_readouts, w.spec)?, 0..n)?.whitening(w.k))
        }
        ServedReadout::Pooled(_) => None,
    };
    // Each probe row's features: a readout as it is, or whitened.
    let features = |name: &str| -> Result<(eval::Features, eval::Features)> {
        if let Some(w) = whitened.iter().find(|w| w.name() == name) {
            let (tr, te) = (
                grid_features(&train_readouts, w.spec)?,
                grid_features(&test_readouts, w.spec)?,
            );
            let (mean, projection) = match (&whitening, served) {
                (Some(fitted), ServedReadout::Whitened(s)) if s == *w => fitted.clone(),
                _ => eval::Pca::fit(&tr, 0..n)?.whitening(w.k),
            };
            return Ok((
                eval::whiten(&tr, &mean, &projection)?,
                eval::whiten(&te, &mean, &projection)?,
            ));
        }
        let i = readout_index(&train_readouts, name)?;
        Ok((
            train_readouts[i].features.clone(),
            test_readouts[i].features.clone(),
        ))
    };
    // k-NN and the linear probe of one feature set on test, printed and kept.
    let mut probes = serde_json::Map::new();
    let mut probe = |label: &str,
                     readout: Option<&str>,
                     tr: &eval::Features,
                     te: &eval::Features|
     -> Result<()> {
        let knn = eval::knn(tr, &train.labels, te, &test.labels, &[20, 5])?;
        let (linear, penalty) = eval::softmax_probe(tr, &train.labels, te, &test.labels, val)?;
        let (ridge, alpha) = eval::ridge_probe(tr, &train.labels, te, &test.labels, val);
        println!(
            "{label:>16} ({}): 20-NN {:.2} %, 5-NN {:.2} %, linear probe {:.2} % (L2 {penalty}), ridge {:.2} % (α {alpha})",
            readout.unwrap_or("-"),
            knn[0] * 100.0,
            knn[1] * 100.0,
            linear * 100.0,
            ridge * 100.0
        );
        probes.insert(
            label.into(),
            json!({"readout": readout, "dim": tr.dim, "knn20": knn[0], "knn5": knn[1],
                   "linear_probe": linear, "linear_probe_l2": penalty,
                   "ridge_probe": ridge, "ridge_alpha": alpha}),
        );
        Ok(())
    };
    let mut rows = vec![
        ("default", served.name()),
        ("cls", "final.cls".to_string()),
        ("mean", "final.mean".to_string()),
    ];
    if !rows.iter().any(|(_, r)| *r == selected) {
        rows.push(("selected", selected.clone()));
    }
    for (label, readout) in rows {
        let (tr, te) = features(&readout)?;
        probe(label, Some(&readout), &tr, &te)?;
    }
    if args.pixel_baseline {
        let norm = (cfg.mean[0], cfg.std[0]);
        let (tr, te) = (
            eval::pixel_features(&train, norm),
            eval::pixel_features(&test, norm),
        );
        probe("raw_pixels", None, &tr, &te)?;
        // The same whitening applied to pixels: how much of the default readout's gain is
        // the whitening itself rather than the encoder.
        if let ServedReadout::Whitened(w) = served {
            let (mean, projection) = eval::Pca::fit(&tr, 0..n)?.whitening(w.k);
            let (tr, te) = (
                eval::whiten(&tr, &mean, &projection)?,
                eval::whiten(&te, &mean, &projection)?,
            );
            probe("whitened_pixels", None, &tr, &te)?;
        }
    }
    let recon = eval::reconstruction(&model, &test, 0.75, &device)?;
    println!(
        "masked-patch MSE at 0.75: model {:.4}, mean-colour fill {:.4}",
        recon.model_mse, recon.mean_fill_mse
    );
    let layers = eval::white_box(&model, &test, 1024, &device)?;
    for l in &layers {
        println!(
            "layer {:>2}: R^c {:>8.2}  R {:>8.2}  ΔR {:>8.2}  sparsity {:.3}",
            l.layer, l.coding_rate, l.expansion_rate, l.rate_reduction, l.sparsity
        );
    }
    let results = json!({
        "weights": info.source, "sha256": info.sha256, "config": cfg, "parameters": cfg.parameter_count(),
        "train_images": train.len(), "test_images": test.len(),
        "probes": probes, "validation_knn20": validation,
        "validation_linear_probe": validation_probe, "recommended_pooling": served.pooling().name(),
        "served_readout": served.name(),
        "reconstruction": recon, "layers": layers,
        "seconds": started.elapsed().as_secs_f64(),
    });
    let dir = args.weights.parent().unwrap_or(Path::new("."));
    std::fs::write(
        dir.join("eval.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    let notes = match &args.notes {
        Some(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        None => String::new(),
    };
    write_card(dir, &results, &notes).context("writing the model card")?;
    if let Some(out) = &args.export {
        let mut tensors = checkpoint::read_weights(&args.weights, &device)?.tensors;
        tensors.retain(|name, _| !info.unexpected.contains(name));
        // The recipe pads 28×28 images onto 32×32: the server must do the same.
        let mut serving = checkpoint::ServingMetadata {
            recommended_pooling: Some(served.pooling()),
            small_image_fit: Some(checkpoint::SmallImageFit::Pad),
            whitened_grid: None,
        };
        if let (ServedReadout::Whitened(w), Some((mean, projection))) = (served, &whitening) {
            let d = mean.len();
            // Built as the server will build it: the shapes are checked before they are saved.
            let readout = WhitenedGrid::new(
                w.spec,
                Tensor::from_slice(mean, d, &device)?,
                Tensor::from_slice(projection, (d, w.k), &device)?,
                cfg.dim,
                cfg.depth,
            )?;
            tensors.extend(readout.tensors()?);
            serving.whitened_grid = Some(w.spec);
        }
        checkpoint::save_safetensors(&tensors, &cfg, serving, out)?;
        println!(
            "wrote {} (served by default: {})",
            out.display(),
            served.name()
        );
    }
    Ok(())
}

/// Regions per side of the whitened grid readouts.
const WHITENED_GRID: usize = 4;
/// Whitening widths tried on validation for one block's grid (2,048 values): at most 1,024,
/// an 8 MiB projection.
const WHITENED_WIDTHS: [usize; 3] = [384, 768, 1024];
/// Widths for two neighbouring blocks' grids concatenated (4,096 values): at most 2,048, a
/// 32 MiB projection, the most the binary carries.
const PAIR_WIDTHS: [usize; 2] = [1024, 2048];
/// The pooled tokens `Embed` can serve unasked, simplest first.
const SERVED_POOLED: [Pooling; 2] = [Pooling::Mean, Pooling::Cls];

/// The whitened grids tried: each block alone, and each pair of neighbouring blocks.
fn whitening_candidates(depth: usize) -> Vec<(WhitenedGridSpec, &'static [usize])> {
    let single = (0..depth).map(|l| {
        (
            WhitenedGridSpec::of_layer(l, WHITENED_GRID),
            &WHITENED_WIDTHS[..],
        )
    });
    let pairs = (1..depth).map(|l| {
        let spec = WhitenedGridSpec {
            first_layer: Some(l - 1),
            ..WhitenedGridSpec::of_layer(l, WHITENED_GRID)
        };
        (spec, &PAIR_WIDTHS[..])
    });
    single.chain(pairs).collect()
}

/// The grid features a whitened grid reads: its blocks' `grid{g}` readouts side by side.
fn grid_features(readouts: &[eval::Readout], spec: WhitenedGridSpec) -> Result<eval::Features> {
    let parts = spec
        .layers()
        .map(|l| readout_index(readouts, &format!("layer{l}.grid{}", spec.grid)))
        .collect::<Result<Vec<_>>>()?;
    let parts: Vec<&eval::Features> = parts.iter().map(|&i| &readouts[i].features).collect();
    Ok(eval::Features::concat(&parts))
}

fn readout_index(readouts: &[eval::Readout], name: &str) -> Result<usize> {
    readouts
        .iter()
        .position(|r| r.name == name)
        .with_context(|| format!("no readout {name}"))
}

/// A whitened grid readout at one width.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Whitening {
    spec: WhitenedGridSpec,
    k: usize,
}

impl Whitening {
    /// `layer{l}.whitened-grid{g}-{k}` for one block, `layers{a}-{b}.…` for several.
    fn name(&self) -> String {
        let layers = self.spec.layers();
        let source = if layers.start() == layers.end() {
            format!("layer{}", self.spec.layer)
        } else {
            format!("layers{}-{}", layers.start(), layers.end())
        };
        format!("{source}.whitened-grid{}-{}", self.spec.grid, self.k)
    }
}

/// What a request that names no pooling gets: the final cls or mean token, or a whitened
/// grid the weights carry, whichever did best on validation (ties keep the simpler one).
#[derive(Debug, Clone, Copy, PartialEq)]
enum ServedReadout {
    Pooled(Pooling),
    Whitened(Whitening),
}

impl ServedReadout {
    fn choose(whitened: &[Whitening], accuracy: impl Fn(&str) -> f64) -> Self {
        let candidates = SERVED_POOLED
            .map(Self::Pooled)
            .into_iter()
            .chain(whitened.iter().map(|&w| Self::Whitened(w)));
        candidates
            .fold(None, |best: Option<(Self, f64)>, c| {
                let acc = accuracy(&c.name());
                match best {
                    Some((_, b)) if b >= acc => best,
                    _ => Some((c, acc)),
                }
            })
            .map_or(Self::Pooled(Pooling::Mean), |(c, _)| c)
    }

    fn name(self) -> String {
        match self {
            Self::Pooled(p) => format!("final.{}", p.name()),
            Self::Whitened(w) => w.name(),
        }
    }

    fn pooling(self) -> Pooling {
        match self {
            Self::Pooled(p) => p,
            Self::Whitened(_) => Pooling::WhitenedGrid,
        }
    }
}

/// `model_card.json` and `MODEL_CARD.md` from the recipe, the training log and `eval.json`.
fn write_card(dir: &Path, results: &serde_json::Value, notes: &str) -> Result<()> {
    let read = |f: &str| -> serde_json::Value {
        std::fs::read_to_string(dir.join(f))
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null)
    };
    let (recipe, log) = (read("recipe.json"), read("train_log.json"));
    let card = json!({
        "model": "CRATE-MAE (white-box masked autoencoder), trained from scratch in Rust",
        "data": "Fashion-MNIST (60,000 train / 10,000 test, 28×28 grey, MIT licence), padded to 32×32, replicated to RGB",
        // Where it trained (the log says since it records it), else this machine.
        "hardware": log["hardware"].as_str().map_or_else(trainer::hardware, String::from),
        "config": results["config"], "recipe": recipe["recipe"], "training": log, "evaluation": results,
        "notes": notes,
    });
    std::fs::write(
        dir.join("model_card.json"),
        serde_json::to_string_pretty(&card)?,
    )?;
    let p = &results["probes"];
    let pct = |v: &serde_json::Value| {
        v.as_f64()
            .map_or("–".into(), |x| format!("{:.2} %", x * 100.0))
    };
    let c = &results["config"];
    let rounded = |v: &serde_json::Value| {
        let values: Vec<String> = v
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| format!("{:.4}", x.as_f64().unwrap_or(f64::NAN)))
            .collect();
        format!("[{}]", values.join(", "))
    };
    let final_loss = |i: usize| {
        log["history"]
            .as_array()
            .and_then(|h| h.last())
            .and_then(|last| last[i].as_f64())
            .unwrap_or(f64::NAN)
    };
    let mut md = format!(
        "# Model card: CRATE-MAE on Fashion-MNIST\n\n{}\n\n- Data: {}\n- Architecture: dim {}, depth {} (+ {} decoder layers), {} heads, patch {} on {}×{} px, {} parameters; ISTA step η = {}, sparsity λ = {}\n- Normalisation: mean {}, std {} (per RGB channel)\n- Config: `{}`\n- Recipe: `{}`\n- Training: {} epochs, {:.0} s on {}; final losses (masked-patch MSE, normalised pixels): train {:.4}, validation {:.4}\n\n## Evaluation (test split, frozen encoder)\n\n| features | values | 20-NN | 5-NN | linear probe | ridge probe |\n|---|---|---|---|---|---|\n",
        card["model"].as_str().unwrap_or(""), card["data"].as_str().unwrap_or(""),
        c["dim"], c["depth"], c["decoder_depth"], c["heads"], c["patch_size"], c["img_size"], c["img_size"], results["parameters"],
        c["ista_step_size"], c["lambd"], rounded(&c["mean"]), rounded(&c["std"]),
        results["config"], recipe["recipe"],
        log["epochs_done"], log["seconds"].as_f64().unwrap_or(0.0), card["hardware"].as_str().unwrap_or(""),
        final_loss(0), final_loss(1),
    );
    for name in [
        "default",
        "cls",
        "mean",
        "selected",
        "raw_pixels",
        "whitened_pixels",
    ] {
        if p[name].is_object() {
            let label = match p[name]["readout"].as_str() {
                Some(readout) => format!("{name} (`{readout}`)"),
                None => name.replace('_', " "),
            };
            md += &format!(
                "| {label} | {} | {} | {} | {} | {} |\n",
                p[name]["dim"],
                pct(&p[name]["knn20"]),
                pct(&p[name]["knn5"]),
                pct(&p[name]["linear_probe"]),
                pct(&p[name]["ridge_probe"])
            );
        }
    }
    md += "\n`default` is what `Embed` returns when a request names no pooling: the best on validation (the mean of 20-NN and linear-probe accuracy, on images carved from train; the test split chose nothing) of the final cls token, the final mean, and the whitened grids. `final.*` pools the encoder's output after its final norm; `layerN.*` pools block N's output (`Embed` with `layer = N`); `gridK` averages the patch tokens over K×K regions; `layerN.whitened-gridK-W` is that grid centred and PCA-whitened to W values by a projection fitted on the training images without labels, shipped in the weights (`Pooling` `whitened-grid`); `layersA-B.whitened-gridK-W` whitens the grids of blocks A to B side by side. `whitened pixels` applies the same whitening to raw pixels: the part of the gain that is the whitening's rather than the encoder's. The linear probe is MAE's and DINO's: a linear classifier trained with cross-entropy on standardised features (multinomial logistic regression, fitted to convergence by L-BFGS, L2 penalty chosen on validation); the ridge probe (least squares on one-hot labels) is kept for comparison with earlier cards.\n";
    if let Some(pooling) = results["recommended_pooling"].as_str() {
        md += &format!("\nRecommended pooling (`eval --export` embeds it, and the whitening when it is one, in the weights): **{pooling}**.\n");
    }
    let r = &results["reconstruction"];
    md += &format!(
        "\nMasked-patch MSE at ratio 0.75 (normalised pixels): model {:.4}, mean-colour fill {:.4}.\n\n## Per-layer white-box picture\n\n| layer | R^c | R | ΔR | sparsity |\n|---|---|---|---|---|\n",
        r["model_mse"].as_f64().unwrap_or(f64::NAN), r["mean_fill_mse"].as_f64().unwrap_or(f64::NAN)
    );
    for l in results["layers"].as_array().into_iter().flatten() {
        md += &format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.3} |\n",
            l["layer"],
            l["coding_rate"].as_f64().unwrap_or(f64::NAN),
            l["expansion_rate"].as_f64().unwrap_or(f64::NAN),
            l["rate_reduction"].as_f64().unwrap_or(f64::NAN),
            l["sparsity"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if !notes.trim().is_empty() {
        md += &format!("\n## Notes\n\n{}\n", notes.trim());
    }
    std::fs::write(dir.join("MODEL_CARD.md"), md)?;
    Ok(())
}

fn samples(args: SamplesArgs) -> Result<()> {
    let (_, test) = load_splits(&args.data)?;
    std::fs::create_dir_all(&args.out)?;
    let mut taken = [0usize; 10];
    for (i, &label) in test.labels.iter().enumerate() {
        let class = label as usize;
        if taken[class] < args.per_class {
            taken[class] += 1;
            let path = args
                .out
                .join(format!("{i:05}-{}.png", data::CLASSES[class]));
            test.image(i).save(&path)?;
            println!("{}", path.display());
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Read by candle (and rayon) on first use, so it must be set before any tensor op.
    std::env::set_var("RAYON_NUM_THREADS", cli.threads.max(1).to_string());
    match cli.command {
        Command::Train(args) => train(args),
        Command::Eval(args) => eval(args),
        Command::Samples(args) => samples(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `Embed` serves unasked, from validation 20-NN: a better intermediate pooled
    /// readout does not count (it needs `layer`); a whitened grid does (the weights carry it).
    fn choose(scores: &[(&str, f64)]) -> ServedReadout {
        let whitened: Vec<Whitening> = (0..4)
            .flat_map(|l| [256, 384].map(|k| (l, k)))
            .map(|(l, k)| Whitening {
                spec: WhitenedGridSpec::of_layer(l, 4),
                k,
            })
            .chain([Whitening {
                spec: WhitenedGridSpec {
                    first_layer: Some(0),
                    ..WhitenedGridSpec::of_layer(1, 4)
                },
                k: 2048,
            }])
            .collect();
        ServedReadout::choose(&whitened, |name| {
            scores
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(f64::NEG_INFINITY, |(_, a)| *a)
        })
    }

    #[test]
    fn the_best_servable_readout_is_served_and_ties_keep_the_simpler_one() {
        let pooled = [
            ("final.cls", 0.81),
            ("final.mean", 0.80),
            ("layer2.mean", 0.99),
        ];
        assert_eq!(choose(&pooled), ServedReadout::Pooled(Pooling::Cls));
        let mean_wins = [("final.cls", 0.79), ("final.mean", 0.80)];
        assert_eq!(choose(&mean_wins), ServedReadout::Pooled(Pooling::Mean));
        let tie = [("final.cls", 0.80), ("final.mean", 0.80)];
        assert_eq!(choose(&tie), ServedReadout::Pooled(Pooling::Mean));
        let whitened = [
            ("final.cls", 0.78),
            ("final.mean", 0.80),
            ("layer1.whitened-grid4-256", 0.86),
            ("layer2.whitened-grid4-256", 0.87),
            ("layer2.whitened-grid4-384", 0.87),
        ];
        assert_eq!(
            choose(&whitened),
            ServedReadout::Whitened(Whitening {
                spec: WhitenedGridSpec::of_layer(2, 4),
                k: 256
            }),
            "the narrower of two equal whitenings"
        );
        assert_eq!(choose(&whitened).pooling(), Pooling::WhitenedGrid);
        let no_gain = [("final.mean", 0.80), ("layer2.whitened-grid4-256", 0.80)];
        assert_eq!(choose(&no_gain), ServedReadout::Pooled(Pooling::Mean));
        let pair = [
            ("final.mean", 0.80),
            ("layer1.whitened-grid4-384", 0.87),
            ("layers0-1.whitened-grid4-2048", 0.88),
        ];
        let served = choose(&pair);
        assert_eq!(served.name(), "layers0-1.whitened-grid4-2048");
        match served {
            ServedReadout::Whitened(w) => assert_eq!(w.spec.layers(), 0..=1),
            other => panic!("{other:?}"),
        }
    }
}
