//! Which model is served: a checkpoint file, or the default built into the binary.
//!
//! Until the trained default model lands (issue "A trained default model ships"), the
//! default is a seeded random-init model, and every surface says so: the log, `GetModelInfo`
//! (`random_weights = true`) and `cratemae_build_info{weights="random-init"}`.

use crate_mae::checkpoint::{self, LoadOptions, WeightsFormat, WeightsInfo};
use crate_mae::{device, init, CrateMae, CrateMaeConfig};

use crate::config::Config;
use crate::pb;

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
    let loaded = match &config.weights {
        Some(path) if !config.random_weights => {
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
        _ => {
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
                "serving a RANDOM-INIT model (no trained weights given): embeddings and completions are not meaningful"
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
