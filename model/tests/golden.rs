//! Parity with the official PyTorch CRATE-MAE on golden vectors.
//!
//! `CRATE_MAE_GOLDEN` is a `:`-separated list of golden directories (the layout of
//! `tests/golden/set_a`, sizes read from each `config.json`); by default every set committed
//! under `model/tests/golden/`. An explicitly named directory that fails to load fails the test.
//! Every tensor of `outputs.safetensors` must be matched: a golden tensor this test does not
//! know is a failure, not a skip.
//!
//! Precision and device: `CRATE_MAE_TEST_DTYPES` (default `f32,bf16`) and
//! `CRATE_MAE_TEST_DEVICE` (default `cpu`; `cuda` on a GPU build). In f32 every element must
//! match within atol 1e-4 + rtol 1e-4. Reduced precision cannot match element by element
//! (ReLU flips near the threshold, 8-bit mantissas), so there each tensor's relative L2 error
//! ‖ours − golden‖ / ‖golden‖ must stay within the dtype's bound (bf16 5e-2, f16 1e-2), and
//! the pooled embeddings' cosine similarity with the golden ones must be at least 0.999.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use crate_mae::checkpoint::{self, LoadOptions, PthLayout, WeightsFormat};
use crate_mae::mae::{masked_mse, normalise_patches, pool};
use crate_mae::{
    device, diagnostics, CrateMae, CrateMaeConfig, DecoderTrace, EncoderTrace, Mask, Pooling,
    Precision,
};

const ATOL: f64 = 1e-4;
const RTOL: f64 = 1e-4;
const MIN_EMBEDDING_COSINE: f64 = 0.999;

/// The largest relative L2 error a reduced precision may show on any golden tensor.
fn relative_bound(p: Precision) -> Option<f64> {
    match p {
        Precision::F32 => None,
        Precision::Bf16 => Some(5e-2),
        Precision::F16 => Some(1e-2),
    }
}

fn test_device() -> Result<Device> {
    let spec = std::env::var("CRATE_MAE_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    Ok(device::parse_device(&spec)?)
}

fn test_precisions() -> Result<Vec<Precision>> {
    std::env::var("CRATE_MAE_TEST_DTYPES")
        .unwrap_or_else(|_| "f32,bf16".into())
        .split(',')
        .map(|p| Ok(p.trim().parse::<Precision>()?))
        .collect()
}

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
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
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
    precision: Precision,
    checked: BTreeSet<String>,
    failures: Vec<String>,
    /// Largest |diff| (f32) or relative L2 error (reduced precision), and where.
    worst: (f64, String),
}

impl<'a> Checker<'a> {
    fn new(golden: &'a Golden, precision: Precision) -> Self {
        Self {
            golden,
            precision,
            checked: BTreeSet::new(),
            failures: vec![],
            worst: (0.0, String::new()),
        }
    }

    fn note_worst(&mut self, value: f64, name: &str) {
        if value > self.worst.0 {
            self.worst = (value, name.to_string());
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
        if let Some(bound) = relative_bound(self.precision) {
            let err = relative_l2(&ours_v, &want_v);
            self.note_worst(err, name);
            if err.is_nan() || err > bound {
                self.failures.push(format!(
                    "{name}: relative L2 error {err:.3e} above {bound:.0e}"
                ));
            }
            return Ok(());
        }
        let mut bad = 0;
        let mut max_excess: f64 = f64::NEG_INFINITY;
        for (a, b) in ours_v.iter().zip(&want_v) {
            let excess = (a - b).abs() - (ATOL + RTOL * b.abs());
            max_excess = max_excess.max(excess);
            self.note_worst((a - b).abs(), name);
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

    /// Reduced precision: pooled embeddings must point where the golden ones do.
    fn cosine(&mut self, name: &str, ours: &Tensor) -> Result<()> {
        if self.precision == Precision::F32 {
            return Ok(());
        }
        let want: Vec<Vec<f64>> = self.golden.outputs[name].to_dtype(DType::F64)?.to_vec2()?;
        let ours: Vec<Vec<f64>> = ours
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F64)?
            .to_vec2()?;
        for (i, (a, b)) in ours.iter().zip(&want).enumerate() {
            let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            let cos = dot / (norm(a) * norm(b));
            if cos.is_nan() || cos < MIN_EMBEDDING_COSINE {
                self.failures.push(format!(
                    "{name}[{i}]: cosine similarity {cos:.5} below {MIN_EMBEDDING_COSINE}"
                ));
            }
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
        let measure = match self.precision {
            Precision::F32 => "largest |diff|",
            _ => "largest relative L2 error",
        };
        eprintln!(
            "{what}: {} tensors match ({measure} {:.2e}, in {})",
            self.checked.len(),
            self.worst.0,
            self.worst.1
        );
        Ok(())
    }
}

fn relative_l2(ours: &[f64], want: &[f64]) -> f64 {
    let diff: f64 = ours.iter().zip(want).map(|(a, b)| (a - b).powi(2)).sum();
    let norm: f64 = want.iter().map(|b| b * b).sum();
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// The golden names of an encoder trace's tensors, under `prefix` (`mae` or `full`).
fn encoder_named(prefix: &str, t: &EncoderTrace) -> Vec<(String, Tensor)> {
    let mut named = vec![
        (format!("{prefix}.patch_embed"), t.patch_embed.clone()),
        (format!("{prefix}.enc_input"), t.enc_input.clone()),
        (format!("{prefix}.latent"), t.latent.clone()),
    ];
    for (i, b) in t.blocks.iter().enumerate() {
        for (leaf, tensor) in [
            ("ln1", &b.ln1),
            ("qkv", &b.qkv),
            ("attn", &b.attn),
            ("mssa", &b.mssa),
            ("z_half", &b.z_half),
            ("ln2", &b.ln2),
            ("out", &b.out),
        ] {
            named.push((format!("{prefix}.enc.{i}.{leaf}"), tensor.clone()));
        }
    }
    named
}

/// The golden names of a decoder trace's tensors.
fn decoder_named(prefix: &str, t: &DecoderTrace) -> Vec<(String, Tensor)> {
    let mut named = vec![
        (format!("{prefix}.dec.norm"), t.norm.clone()),
        (
            format!("{prefix}.dec.pred_with_cls"),
            t.pred_with_cls.clone(),
        ),
        (format!("{prefix}.pred"), t.pred.clone()),
    ];
    for (i, b) in t.blocks.iter().enumerate() {
        for (leaf, tensor) in [
            ("ln1", &b.ln1),
            ("lin", &b.lin),
            ("ln2", &b.ln2),
            ("qkv", &b.qkv),
            ("attn", &b.attn),
            ("mssa", &b.mssa),
            ("out", &b.out),
        ] {
            named.push((format!("{prefix}.dec.{i}.{leaf}"), tensor.clone()));
        }
    }
    named
}

/// Runs the masked and the no-mask pass and compares everything.
fn check_model(golden: &Golden, model: &CrateMae, what: &str) -> Result<()> {
    let dev = model.device().clone();
    let imgs = golden.input("imgs")?.to_device(&dev)?;
    let noise: Vec<Vec<f32>> = golden.input("noise")?.to_vec2()?;
    let ratio = golden.input("mask_ratio")?.to_vec1::<f32>()?[0];
    let precision = model.precision();
    let mut c = Checker::new(golden, precision);

    // Masked pass (mae.*), mask from the official noise.
    let mask = Mask::from_noise(&noise, ratio)?;
    let expected_mask: Vec<Vec<f32>> = golden.input("mask")?.to_vec2()?;
    let ours_mask: Vec<Vec<f32>> = mask.to_tensor(&Device::Cpu)?.to_vec2()?;
    if ours_mask != expected_mask {
        bail!("{what}: mask from noise differs from the official mask");
    }
    let encoder = model.trace_encoder(&imgs, Some(&mask))?;
    let decoder = model.trace_decoder(&encoder.latent)?;
    for (name, tensor) in encoder_named("mae", &encoder)
        .into_iter()
        .chain(decoder_named("mae", &decoder))
    {
        c.check(&name, &tensor)?;
    }
    // The serving entry points (no traces) compute the same thing.
    c.check("mae.latent", &model.encode(&imgs, Some(&mask))?)?;
    let completion = model.complete(&imgs, &mask)?;
    c.check("mae.pred", &completion.pred)?;
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
    let x_masked = (0..imgs.dim(0)?)
        .map(|b| encoder.patch_embed.i(b)?.index_select(&ids_keep.i(b)?, 0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    c.check("mae.x_masked", &Tensor::stack(&x_masked, 0)?)?;

    // No-mask pass (full.*): the embedding path, its diagnostics, and plain autoencoding.
    let encoder = model.trace_encoder(&imgs, None)?;
    let decoder = model.trace_decoder(&encoder.latent)?;
    for (name, tensor) in encoder_named("full", &encoder)
        .into_iter()
        .chain(decoder_named("full", &decoder))
    {
        c.check(&name, &tensor)?;
    }
    let latent = model.embed_tokens(&imgs)?;
    c.check("full.latent", &latent)?;
    for (name, pooling) in [
        ("full.pool_cls", Pooling::Cls),
        ("full.pool_mean", Pooling::Mean),
    ] {
        let pooled = pool(&latent, pooling)?;
        c.check(name, &pooled)?;
        c.cosine(name, &pooled)?;
    }
    c.check(
        "full.recon",
        &crate_mae::patch_embed::unpatchify(
            &decoder.pred.to_dtype(DType::F32)?,
            golden.cfg.patch_size,
            golden.cfg.in_chans,
        )?,
    )?;
    for layer in diagnostics::compute(&encoder.blocks, model.config())? {
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
        if precision == Precision::F32 {
            c.scalar(&format!("full.enc.{i}.zero_frac_std"), zf_pop_std)?;
        } else {
            // A spread of a few per mille moves by whole multiples of itself when one
            // near-threshold value flips; the per-sample fractions above bound it already.
            c.checked.insert(format!("full.enc.{i}.zero_frac_std"));
        }
        // The attention-map entry point must agree with the traced one.
        c.check(
            &format!("full.enc.{i}.attn"),
            &model.attention_maps(&imgs, i)?,
        )?;
    }
    c.finish(what)
}

fn for_each_golden(file: &str, expect: WeightsFormat) -> Result<()> {
    let explicit = std::env::var("CRATE_MAE_GOLDEN").is_ok();
    let dirs = golden_dirs()?;
    let device = test_device()?;
    let mut failures = vec![];
    let mut runs = 0;
    for dir in &dirs {
        for precision in test_precisions()? {
            runs += 1;
            let run = || -> Result<()> {
                let golden = Golden::load(dir)?;
                let path = golden.dir.join(file);
                let options = LoadOptions {
                    config: Some(golden.cfg.clone()),
                    ..Default::default()
                };
                let (model, info) = checkpoint::load(&path, &options, &device)
                    .with_context(|| format!("loading {}", path.display()))?;
                if info.format != expect {
                    bail!(
                        "{}: read as {:?}, expected {expect:?}",
                        path.display(),
                        info.format
                    );
                }
                let model = model.with_precision(precision)?;
                let what = format!("{} ({precision}, {device:?})", path.display());
                check_model(&golden, &model, &what)
            };
            if let Err(e) = run() {
                failures.push(format!("{} {precision}: {e:#}", dir.display()));
            }
        }
    }
    if !failures.is_empty() {
        bail!(
            "{} of {runs} golden runs failed{}:\n{}",
            failures.len(),
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
