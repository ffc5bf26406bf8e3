//! Parity with the official PyTorch CRATE-MAE on golden vectors.
//!
//! `CRATE_MAE_GOLDEN` is a `:`-separated list of golden directories (the layout of
//! `shared/golden/set_a`, sizes read from each `config.json`); by default every directory under
//! `../shared/golden/`. An explicitly named directory that fails to load fails the test.
//! Every tensor of `outputs.safetensors` must be matched (atol 1e-4 + rtol 1e-4): a golden
//! tensor this test does not know is a failure, not a skip.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use crate_mae::checkpoint::{self, LoadOptions, PthLayout, WeightsFormat};
use crate_mae::mae::{masked_mse, normalise_patches, pool};
use crate_mae::{diagnostics, CrateMae, CrateMaeConfig, Mask, Pooling, Taps};

const ATOL: f64 = 1e-4;
const RTOL: f64 = 1e-4;

fn golden_dirs() -> Result<Vec<PathBuf>> {
    if let Ok(list) = std::env::var("CRATE_MAE_GOLDEN") {
        let dirs: Vec<PathBuf> = list
            .split(':')
            .filter(|s| !s.is_empty())
            .map(PathBuf::from)
            .collect();
        if dirs.is_empty() {
            bail!("CRATE_MAE_GOLDEN is set but names no directory");
        }
        return Ok(dirs);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .with_context(|| format!("no golden directory at {}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("config.json").is_file())
        .collect();
    dirs.sort();
    if dirs.is_empty() {
        bail!("no golden sets under {}", root.display());
    }
    Ok(dirs)
}

struct Golden {
    dir: PathBuf,
    cfg: CrateMaeConfig,
    inputs: HashMap<String, Tensor>,
    outputs: HashMap<String, Tensor>,
}

impl Golden {
    fn load(dir: &Path) -> Result<Self> {
        let json = std::fs::read_to_string(dir.join("config.json"))
            .with_context(|| format!("{}: config.json", dir.display()))?;
        let cfg: CrateMaeConfig = serde_json::from_str(&json).context("config.json")?;
        cfg.validate()?;
        let read = |f: &str| {
            candle_core::safetensors::load(dir.join(f), &Device::Cpu)
                .with_context(|| format!("{}: {f}", dir.display()))
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            cfg,
            inputs: read("inputs.safetensors")?,
            outputs: read("outputs.safetensors")?,
        })
    }

    fn input(&self, name: &str) -> Result<&Tensor> {
        self.inputs
            .get(name)
            .ok_or_else(|| anyhow!("inputs.safetensors has no `{name}`"))
    }
}

/// Compares and records which golden names were checked.
struct Checker<'a> {
    golden: &'a Golden,
    checked: BTreeSet<String>,
    failures: Vec<String>,
    worst: f64,
}

impl<'a> Checker<'a> {
    fn new(golden: &'a Golden) -> Self {
        Self {
            golden,
            checked: BTreeSet::new(),
            failures: vec![],
            worst: 0.0,
        }
    }

    fn check(&mut self, name: &str, ours: &Tensor) -> Result<()> {
        let want = self
            .golden
            .outputs
            .get(name)
            .ok_or_else(|| anyhow!("golden set has no `{name}`"))?;
        self.checked.insert(name.to_string());
        let want_v: Vec<f64> = want.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let ours = ours.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
        if ours.elem_count() != want_v.len() {
            self.failures.push(format!(
                "{name}: shape {:?} vs golden {:?}",
                ours.dims(),
                want.dims()
            ));
            return Ok(());
        }
        let ours_v: Vec<f64> = ours.flatten_all()?.to_vec1()?;
        let mut bad = 0;
        let mut max_excess: f64 = f64::NEG_INFINITY;
        for (a, b) in ours_v.iter().zip(&want_v) {
            let excess = (a - b).abs() - (ATOL + RTOL * b.abs());
            max_excess = max_excess.max(excess);
            self.worst = self.worst.max((a - b).abs());
            if excess > 0.0 || a.is_nan() != b.is_nan() {
                bad += 1;
            }
        }
        if bad > 0 {
            self.failures.push(format!(
                "{name}: {bad}/{} elements outside atol {ATOL} + rtol {RTOL} (worst by {max_excess:.3e})",
                want_v.len()
            ));
        }
        Ok(())
    }

    fn scalar(&mut self, name: &str, value: f64) -> Result<()> {
        self.check(name, &Tensor::new(&[value as f32], &Device::Cpu)?)
    }

    fn vector(&mut self, name: &str, values: &[f64]) -> Result<()> {
        let v: Vec<f32> = values.iter().map(|v| *v as f32).collect();
        self.check(name, &Tensor::new(v.as_slice(), &Device::Cpu)?)
    }

    fn finish(self, what: &str) -> Result<()> {
        let all: BTreeSet<String> = self.golden.outputs.keys().cloned().collect();
        let unchecked: Vec<_> = all.difference(&self.checked).collect();
        if !unchecked.is_empty() {
            bail!("{what}: golden tensors not compared: {unchecked:?}");
        }
        if !self.failures.is_empty() {
            bail!(
                "{what}: {} mismatches:\n  {}",
                self.failures.len(),
                self.failures.join("\n  ")
            );
        }
        eprintln!(
            "{what}: {} tensors match (largest |diff| {:.2e})",
            self.checked.len(),
            self.worst
        );
        Ok(())
    }
}

fn taps_into(checker: &mut Checker, prefix: &str, taps: &Taps) -> Result<()> {
    for name in taps.names() {
        let golden_name = format!("{prefix}.{name}");
        if checker.golden.outputs.contains_key(&golden_name) {
            checker.check(&golden_name, taps.get(name).expect("listed"))?;
        }
    }
    Ok(())
}

/// Runs the masked and the no-mask pass and compares everything.
fn check_model(golden: &Golden, model: &CrateMae, what: &str) -> Result<()> {
    let dev = model.device().clone();
    let imgs = golden.input("imgs")?.to_device(&dev)?;
    let noise: Vec<Vec<f32>> = golden.input("noise")?.to_vec2()?;
    let ratio = golden.input("mask_ratio")?.to_vec1::<f32>()?[0];
    let mut c = Checker::new(golden);

    // Masked pass (mae.*), mask from the official noise.
    let mask = Mask::from_noise(&noise, ratio)?;
    let expected_mask: Vec<Vec<f32>> = golden.input("mask")?.to_vec2()?;
    let ours_mask: Vec<Vec<f32>> = mask.to_tensor(&Device::Cpu)?.to_vec2()?;
    if ours_mask != expected_mask {
        bail!("{what}: mask from noise differs from the official mask");
    }
    let mut taps = Taps::all();
    let completion = model.complete(&imgs, &mask, &mut taps)?;
    taps_into(&mut c, "mae", &taps)?;
    c.check("mae.mask", &completion.mask)?;
    c.check("mae.recon", &completion.reconstruction)?;
    c.check("mae.recon_pasted", &completion.composite)?;
    let target = model.patchify(&imgs)?;
    c.check("mae.target", &target)?;
    c.check("mae.target_normpix", &normalise_patches(&target)?)?;
    c.check(
        "mae.loss",
        &model
            .loss(&imgs, &completion.pred, &completion.mask, false)?
            .reshape(1)?,
    )?;
    c.check(
        "mae.loss_normpix",
        &masked_mse(
            &completion.pred,
            &normalise_patches(&target)?,
            &completion.mask,
        )?
        .reshape(1)?,
    )?;
    let ids_keep = golden
        .input("ids_keep")?
        .to_dtype(DType::U32)?
        .to_device(&dev)?;
    let patches = taps.get("patch_embed").expect("recorded");
    let x_masked = (0..imgs.dim(0)?)
        .map(|b| patches.i(b)?.index_select(&ids_keep.i(b)?, 0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    c.check("mae.x_masked", &Tensor::stack(&x_masked, 0)?)?;

    // No-mask pass (full.*): the embedding path, its diagnostics, and plain autoencoding.
    let mut taps = Taps::all();
    let latent = model.encode(&imgs, None, &mut taps)?;
    let pred = model.decode(&latent, &mut taps)?;
    taps_into(&mut c, "full", &taps)?;
    c.check("full.pool_cls", &pool(&latent, Pooling::Cls)?)?;
    c.check("full.pool_mean", &pool(&latent, Pooling::Mean)?)?;
    c.check(
        "full.recon",
        &crate_mae::patch_embed::unpatchify(&pred, golden.cfg.patch_size, golden.cfg.in_chans)?,
    )?;
    for layer in diagnostics::compute(&taps, model.config())? {
        let i = layer.layer;
        let (rc_mean, rc_std) = diagnostics::mean_std(&layer.coding_rate);
        c.vector(&format!("full.enc.{i}.rc_per_sample"), &layer.coding_rate)?;
        c.scalar(&format!("full.enc.{i}.rc_mean"), rc_mean)?;
        c.scalar(&format!("full.enc.{i}.rc_std"), rc_std)?;
        let (zf_mean, _) = diagnostics::mean_std(&layer.sparsity);
        // The official sparsity std is numpy's population std.
        let n = layer.sparsity.len() as f64;
        let zf_pop_std = (layer
            .sparsity
            .iter()
            .map(|v| (v - zf_mean).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        c.vector(
            &format!("full.enc.{i}.zero_frac_per_sample"),
            &layer.sparsity,
        )?;
        c.scalar(&format!("full.enc.{i}.zero_frac_mean"), zf_mean)?;
        c.scalar(&format!("full.enc.{i}.zero_frac_std"), zf_pop_std)?;
        // The attention map entry point must agree with the tapped one.
        let attn = model.attention_maps(&imgs, i)?;
        c.check(&format!("full.enc.{i}.attn"), &attn)?;
    }
    c.finish(what)
}

fn for_each_golden(file: &str, expect: WeightsFormat) -> Result<()> {
    let explicit = std::env::var("CRATE_MAE_GOLDEN").is_ok();
    let dirs = golden_dirs()?;
    let mut failures = vec![];
    for dir in &dirs {
        let run = || -> Result<()> {
            let golden = Golden::load(dir)?;
            let path = golden.dir.join(file);
            let options = LoadOptions {
                config: Some(golden.cfg.clone()),
                ..Default::default()
            };
            let (model, info) = checkpoint::load(&path, &options, &Device::Cpu)
                .with_context(|| format!("loading {}", path.display()))?;
            if info.format != expect {
                bail!(
                    "{}: read as {:?}, expected {expect:?}",
                    path.display(),
                    info.format
                );
            }
            check_model(&golden, &model, &path.display().to_string())
        };
        if let Err(e) = run() {
            failures.push(format!("{}: {e:#}", dir.display()));
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {} golden sets failed{}:\n{}",
            failures.len(),
            dirs.len(),
            if explicit { " (CRATE_MAE_GOLDEN)" } else { "" },
            failures.join("\n")
        );
    }
    Ok(())
}

#[test]
fn golden_parity_safetensors() -> Result<()> {
    for_each_golden("weights.safetensors", WeightsFormat::Safetensors)
}

#[test]
fn golden_parity_pth_training_layout() -> Result<()> {
    for_each_golden(
        "checkpoint.pth",
        WeightsFormat::Pth {
            layout: PthLayout::ModelKey,
        },
    )
}

#[test]
fn golden_parity_pth_module_prefix() -> Result<()> {
    for_each_golden(
        "checkpoint_module_prefix.pth",
        WeightsFormat::Pth {
            layout: PthLayout::StateDictKey,
        },
    )
}

/// The configuration read off the tensor shapes (given only the head count) is the golden one,
/// and the fixed sin-cos tables we generate equal the official ones.
#[test]
fn golden_config_and_position_tables_from_checkpoint() -> Result<()> {
    for dir in golden_dirs()? {
        let golden = Golden::load(&dir)?;
        let raw = checkpoint::read_weights(&dir.join("weights.safetensors"), &Device::Cpu)?;
        let inferred = checkpoint::infer_config(
            &raw.tensors,
            &CrateMaeConfig::default(),
            Some(golden.cfg.heads),
        )?;
        assert_eq!(inferred, golden.cfg, "{}", dir.display());
        let table =
            crate_mae::patch_embed::sincos_pos_embed(golden.cfg.dim, golden.cfg.grid_size());
        let official: Vec<f32> = raw.tensors["decoder_pos_embed"].flatten_all()?.to_vec1()?;
        let worst = table
            .iter()
            .zip(&official)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-6,
            "{}: sin-cos table differs by {worst}",
            dir.display()
        );
    }
    Ok(())
}
