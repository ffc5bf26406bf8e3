//! Which model is served: a checkpoint file, the built-in default, or a seeded random-init
//! model (benchmarks and tests; labelled as random on every surface). Loaded on the engine's
//! loader thread, which then owns the device.
//!
//! The built-in default is a CRATE-MAE trained from scratch on Fashion-MNIST by
//! `crate-mae-train` with the recipe in its model card (`server/assets/default-model/`). It is
//! compiled into the binary, so the server needs no download and no configuration.

use crate_mae::checkpoint::{self, LoadOptions, WeightsFormat, WeightsInfo};
use crate_mae::{device, init, CrateMae, CrateMaeConfig, Pooling, Precision};

use crate::config::Config;
use crate::engine::CandleBackend;
use crate::engine::ModelFacts;

/// The built-in model's weights (safetensors with the config embedded).
const BUILT_IN_WEIGHTS: &[u8] = include_bytes!("../assets/default-model/model.safetensors");
const BUILT_IN_SOURCE: &str =
    "built-in: CRATE-MAE trained on Fashion-MNIST (server/assets/default-model)";
/// Its model card: mean pooling beats the cls token by 2.6 points of 20-NN accuracy.
const BUILT_IN_POOLING: Pooling = Pooling::Mean;

/// Reads the weights onto the configured device in the configured precision.
pub fn load(config: &Config) -> Result<CandleBackend, String> {
    let device = device::parse_device(&config.device).map_err(|e| e.to_string())?;
    let precision: Precision = config.dtype;
    precision.check_device(&device).map_err(|e| e.to_string())?;
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
    let model: CrateMae = model
        .with_precision(precision)
        .map_err(|e| format!("converting the weights to {precision}: {e}"))?;
    let recommended_pooling = if built_in {
        BUILT_IN_POOLING
    } else {
        weights.recommended_pooling.unwrap_or_default()
    };
    let facts = ModelFacts {
        config: model.config().clone(),
        device: device::describe(model.device()),
        weights,
        random_seed,
        precision,
        recommended_pooling,
    };
    tracing::info!(
        weights = %facts.weights.source,
        sha256 = %facts.weights.sha256,
        device = %facts.device,
        dtype = %precision,
        pooling = recommended_pooling.name(),
        "model loaded"
    );
    Ok(CandleBackend::new(model, facts))
}
