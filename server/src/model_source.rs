//! Which model is served: a checkpoint file, the built-in default, or a seeded random-init
//! model (benchmarks and tests; labelled as random on every surface). Loaded on the engine's
//! loader thread, which then owns the device.
//!
//! The built-in default is a CRATE-MAE trained from scratch on Fashion-MNIST by
//! `crate-mae-train` with the recipe in its model card (`server/assets/default-model/`). It is
//! compiled into the binary, so the server needs no download and no configuration.

use crate_mae::checkpoint::{self, LoadOptions, SmallImageFit, WeightsFormat, WeightsInfo};
use crate_mae::{device, init, CrateMae, CrateMaeConfig, Pooling, Precision};

use crate::config::Config;
use crate::engine::CandleBackend;
use crate::engine::{ModelFacts, WhitenedGridFacts};

/// The built-in model's weights (safetensors with the config embedded).
const BUILT_IN_WEIGHTS: &[u8] = include_bytes!("../assets/default-model/model.safetensors");
const BUILT_IN_SOURCE: &str =
    "built-in: CRATE-MAE trained on Fashion-MNIST (server/assets/default-model)";
/// What the built-in model is served with if its weights did not say (they do: `eval
/// --export` writes the recommended pooling and the fit into the file).
const BUILT_IN_POOLING: Pooling = Pooling::Mean;
/// It was trained on 28×28 images padded onto 32×32: a 28×28 PNG is padded the same way.
const BUILT_IN_FIT: SmallImageFit = SmallImageFit::Pad;

/// Reads the weights onto the configured device in the configured precision.
pub fn load(config: &Config) -> Result<CandleBackend, String> {
    let device = device::parse_device(&config.device).map_err(|e| e.to_string())?;
    if let Some(precision) = config.dtype.0 {
        precision.check_device(&device).map_err(|e| e.to_string())?;
    }
    let preset = match &config.preset {
        Some(name) => Some(CrateMaeConfig::preset(name).map_err(|e| e.to_string())?),
        None => None,
    };
    let (model, weights, random_seed, built_in) = match (&config.weights, config.random_weights) {
        (Some(path), _) => {
            let options = LoadOptions {
                config: None,
                heads: config.heads.or(preset.as_ref().map(|p| p.heads)),
            };
            let (model, info) =
                checkpoint::load(path, &options, &device).map_err(|e| e.to_string())?;
            (model, info, None, false)
        }
        (None, true) => {
            let mut cfg = preset.unwrap_or_else(CrateMaeConfig::tiny);
            if let Some(size) = config.image_size {
                cfg.img_size = size;
            }
            let weights =
                init::random_weights(&cfg, config.seed, &device).map_err(|e| e.to_string())?;
            let model = checkpoint::model_from_tensors(weights, &cfg, &device)
                .map_err(|e| e.to_string())?;
            tracing::warn!(
                seed = config.seed,
                "serving a RANDOM-INIT model (--random-weights): embeddings and completions are not meaningful"
            );
            let info = WeightsInfo {
                source: format!("random-init (seed {})", config.seed),
                format: WeightsFormat::Random,
                sha256: String::new(),
                unexpected: vec![],
                recommended_pooling: None,
                small_image_fit: None,
            };
            (model, info, Some(config.seed), false)
        }
        (None, false) => {
            let (model, info) = checkpoint::load_bytes(
                BUILT_IN_WEIGHTS,
                BUILT_IN_SOURCE,
                &LoadOptions::default(),
                &device,
            )
            .map_err(|e| format!("the built-in model does not load: {e}"))?;
            (model, info, None, true)
        }
    };
    let channels = model.config().in_chans;
    if channels != 3 {
        return Err(format!(
            "the model takes {channels}-channel images; the server feeds RGB (3 channels)"
        ));
    }
    if !weights.unexpected.is_empty() {
        tracing::warn!(tensors = ?weights.unexpected, "checkpoint tensors not used by the model");
    }
    let (model, precision, precision_reason) = match config.dtype.0 {
        Some(precision) => {
            let model = model
                .with_precision(precision)
                .map_err(|e| format!("converting the weights to {precision}: {e}"))?;
            (model, precision, "--dtype".to_string())
        }
        None => choose_precision(model, config.max_batch_size())?,
    };
    let (pooling_fallback, fit_fallback) = if built_in {
        (BUILT_IN_POOLING, BUILT_IN_FIT)
    } else {
        Default::default()
    };
    let recommended_pooling = weights.recommended_pooling.unwrap_or(pooling_fallback);
    let small_image_fit = weights.small_image_fit.unwrap_or(fit_fallback);
    let whitened_grid = model.whitened_grid().map(|w| WhitenedGridFacts {
        spec: w.spec,
        dim: w.dim(),
    });
    let facts = ModelFacts {
        config: model.config().clone(),
        device: device::describe(model.device()),
        weights,
        random_seed,
        precision,
        precision_reason,
        kernel: model.kernel(),
        recommended_pooling,
        small_image_fit,
        whitened_grid,
    };
    tracing::info!(
        weights = %facts.weights.source,
        sha256 = %facts.weights.sha256,
        device = %facts.device,
        dtype = %precision,
        dtype_reason = %facts.precision_reason,
        pooling = recommended_pooling.name(),
        small_image_fit = small_image_fit.name(),
        "model loaded"
    );
    Ok(CandleBackend::new(model, facts))
}

/// `--dtype auto`'s rule: bf16 only where this machine computes it at least this much faster.
const AUTO_BF16_MIN_SPEEDUP: f64 = 1.25;
/// ... and where every probe image's embedding stays this close to f32's.
const AUTO_BF16_MIN_COSINE: f64 = 0.999;

/// `--dtype auto`: on a GPU, bf16; on a CPU without a bf16 kernel, f32; otherwise the encoder
/// is timed once in each (best of three passes over a batch) and bf16 is kept only if it is
/// decisively faster and accurate. The margins matter: on the CPUs measured bf16 is either about
/// 2× faster (Zen 4's AVX512-BF16) or 2-3× slower (Intel without AMX), so noise does not flip it.
fn choose_precision(
    model: CrateMae,
    max_batch: usize,
) -> Result<(CrateMae, Precision, String), String> {
    let err = |e: crate_mae::ModelError| e.to_string();
    if !model.device().is_cpu() {
        let bf16 = model.with_precision(Precision::Bf16).map_err(err)?;
        return Ok((bf16, Precision::Bf16, "auto: bf16 on a GPU".into()));
    }
    if !crate_mae::cpu::matmul::bf16_supported() {
        return Ok((
            model,
            Precision::F32,
            "auto: f32 (no AVX512_BF16 on this CPU)".into(),
        ));
    }
    let bf16 = model.with_precision(Precision::Bf16).map_err(err)?;
    let c = model.config();
    let batch = max_batch.clamp(1, 8);
    let images = candle_core::Tensor::randn(
        0f32,
        1.0,
        (batch, c.in_chans, c.img_size, c.img_size),
        model.device(),
    )
    .map_err(|e| e.to_string())?;
    let time = |m: &CrateMae| -> Result<(f64, Vec<Vec<f32>>), String> {
        // The embedding compared: the whitened grid when the model ships one (whitening
        // scales low-variance directions up, and with them bf16's rounding), else the mean.
        let embed = || -> Result<Vec<Vec<f32>>, String> {
            let pooled = match m.whitened_grid() {
                Some(w) => {
                    let keep = crate_mae::Keep {
                        outputs: w.spec.layers().collect(),
                        ..Default::default()
                    };
                    let encoded = m.encode_keeping(&images, None, &keep).map_err(err)?;
                    m.whitened_embedding(&encoded.outputs)
                }
                None => m
                    .embed_tokens(&images)
                    .and_then(|t| crate_mae::mae::pool(&t, Pooling::Mean)),
            };
            pooled
                .and_then(|p| p.to_vec2::<f32>().map_err(Into::into))
                .map_err(err)
        };
        let out = embed()?;
        let mut best = f64::MAX;
        for _ in 0..3 {
            let started = std::time::Instant::now();
            embed()?;
            best = best.min(started.elapsed().as_secs_f64());
        }
        Ok((best, out))
    };
    let (f32_time, reference) = time(&model)?;
    let (bf16_time, approx) = time(&bf16)?;
    let cosine = reference
        .iter()
        .zip(&approx)
        .map(|(a, b)| {
            let dot: f64 = a
                .iter()
                .zip(b)
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            dot / (norm(a) * norm(b)).max(1e-12)
        })
        .fold(1.0, f64::min);
    let speedup = f32_time / bf16_time;
    let measured = format!(
        "bf16 {speedup:.2}× f32's speed at batch {batch}, embeddings' cosine ≥ {cosine:.5}"
    );
    if speedup >= AUTO_BF16_MIN_SPEEDUP && cosine >= AUTO_BF16_MIN_COSINE {
        Ok((bf16, Precision::Bf16, format!("auto: bf16 ({measured})")))
    } else {
        Ok((model, Precision::F32, format!("auto: f32 ({measured})")))
    }
}
