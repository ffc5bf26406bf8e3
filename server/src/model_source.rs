//! Which model is served: a checkpoint file, the built-in default, or a seeded random-init
//! model (benchmarks and tests; labelled as random on every surface).
//!
//! The built-in default is a CRATE-MAE trained from scratch on Fashion-MNIST by
//! `crate-mae-train` with the recipe in its model card (`server/assets/default-model/`). It is
//! compiled into the binary, so the server needs no download and no configuration.

use crate_mae::checkpoint::{self, LoadOptions, WeightsFormat, WeightsInfo};
use crate_mae::{device, init, CrateMae, CrateMaeConfig};

use crate::config::Config;
use crate::pb;

/// The built-in model's weights (safetensors with the config embedded).
const BUILT_IN_WEIGHTS: &[u8] = include_bytes!("../assets/default-model/model.safetensors");
const BUILT_IN_SOURCE: &str =
    "built-in: CRATE-MAE trained on Fashion-MNIST (server/assets/default-model)";

pub struct Loaded {
    pub model: CrateMae,
    pub info: WeightsInfo,
    pub random: bool,
}

/// Loads (on the calling thread, which owns the device) and warms up every batch size.
pub fn load(config: &Config) -> Result<Loaded, String> {
    // Test hook: stretch loading so health checks can observe NOT_SERVING deterministically.
    if let Some(ms) = std::env::var("CRATE_MAE_TEST_LOAD_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    let device = device::parse_device(&config.device).map_err(|e| e.to_string())?;
    let preset = match &config.preset {
        Some(name) => Some(CrateMaeConfig::preset(name).map_err(|e| e.to_string())?),
        None => None,
    };
    let loaded = match (&config.weights, config.random_weights) {
        (Some(path), _) => {
            let options = LoadOptions {
                config: None,
                heads: config.heads.or(preset.as_ref().map(|p| p.heads)),
            };
            let (model, info) =
                checkpoint::load(path, &options, &device).map_err(|e| e.to_string())?;
            Loaded {
                model,
                info,
                random: false,
            }
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
            Loaded {
                model,
                info: WeightsInfo {
                    source: format!("random-init (seed {})", config.seed),
                    format: WeightsFormat::Random,
                    sha256: String::new(),
                    unexpected: vec![],
                },
                random: true,
            }
        }
        (None, false) => {
            let (model, info) = checkpoint::load_bytes(
                BUILT_IN_WEIGHTS,
                BUILT_IN_SOURCE,
                &LoadOptions::default(),
                &device,
            )
            .map_err(|e| format!("the built-in model does not load: {e}"))?;
            Loaded {
                model,
                info,
                random: false,
            }
        }
    };
    let channels = loaded.model.config().in_chans;
    if channels != 3 {
        return Err(format!(
            "the model takes {channels}-channel images; the server feeds RGB (3 channels)"
        ));
    }
    if !loaded.info.unexpected.is_empty() {
        tracing::warn!(tensors = ?loaded.info.unexpected, "checkpoint tensors not used by the model");
    }
    let started = std::time::Instant::now();
    for batch in 1..=config.max_batch_size {
        loaded
            .model
            .warm_up(batch, true)
            .map_err(|e| format!("warm-up at batch {batch} failed: {e}"))?;
    }
    tracing::info!(
        batch_sizes = config.max_batch_size,
        seconds = started.elapsed().as_secs_f64(),
        "warmed up"
    );
    Ok(loaded)
}

pub fn model_info(loaded: &Loaded, config: &Config) -> pb::ModelInfo {
    let cfg = loaded.model.config();
    let format = match loaded.info.format {
        WeightsFormat::Safetensors => "safetensors".to_string(),
        WeightsFormat::Pth { layout } => format!("pth ({layout:?})"),
        WeightsFormat::Random => "random-init".to_string(),
    };
    pb::ModelInfo {
        name: format!(
            "crate-mae d{} depth{} heads{} {}px/p{}{}",
            cfg.dim,
            cfg.depth,
            cfg.heads,
            cfg.img_size,
            cfg.patch_size,
            if loaded.random {
                " (RANDOM INIT, not trained)"
            } else {
                ""
            }
        ),
        image_size: cfg.img_size as u32,
        patch_size: cfg.patch_size as u32,
        in_chans: cfg.in_chans as u32,
        dim: cfg.dim as u32,
        depth: cfg.depth as u32,
        heads: cfg.heads as u32,
        decoder_depth: cfg.decoder_depth as u32,
        ista_step_size: cfg.ista_step_size,
        lambd: cfg.lambd,
        parameter_count: cfg.parameter_count() as u64,
        mean: cfg.mean.to_vec(),
        std: cfg.std.to_vec(),
        weights_source: loaded.info.source.clone(),
        weights_sha256: loaded.info.sha256.clone(),
        weights_format: format,
        random_weights: loaded.random,
        device: device::describe(loaded.model.device()),
        diagnostics_available: true,
        diagnostics: vec![
            "coding_rate".into(),
            "expansion_rate".into(),
            "rate_reduction".into(),
            "sparsity".into(),
        ],
        max_batch_size: config.max_batch_size as u32,
        max_images_per_request: config.max_images_per_request as u32,
        version: env!("CARGO_PKG_VERSION").into(),
    }
}
