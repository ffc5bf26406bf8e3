//! Seeded random weights with the official initialisation: the same seed gives the same
//! model on every platform. Used for benchmarks, the labelled random default model, and as
//! the starting point of training.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::checkpoint::{tensor_specs, Init};
use crate::config::CrateMaeConfig;
use crate::error::Result;
use crate::patch_embed::sincos_pos_embed;

pub fn random_weights(
    cfg: &CrateMaeConfig,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    cfg.validate()?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut tensors = HashMap::new();
    for spec in tensor_specs(cfg) {
        let n = spec.numel();
        let values: Vec<f32> = match spec.init {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Normal { std } => {
                let normal = Normal::new(0.0, std).expect("std is a positive constant");
                (0..n).map(|_| normal.sample(&mut rng) as f32).collect()
            }
            Init::Uniform { bound } => (0..n)
                .map(|_| rng.random_range(-bound..bound) as f32)
                .collect(),
            Init::SinCos => sincos_pos_embed(cfg.dim, cfg.grid_size()),
        };
        tensors.insert(spec.name, Tensor::from_vec(values, spec.shape, device)?);
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_weights() {
        let mut cfg = CrateMaeConfig::tiny();
        cfg.depth = 1;
        cfg.decoder_depth = 1;
        let a = random_weights(&cfg, 7, &Device::Cpu).unwrap();
        let b = random_weights(&cfg, 7, &Device::Cpu).unwrap();
        let c = random_weights(&cfg, 8, &Device::Cpu).unwrap();
        let name = "blocks.0.layers.0.1.fn.weight";
        let diff = |x: &HashMap<String, Tensor>, y: &HashMap<String, Tensor>| {
            (&x[name] - &y[name])
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(diff(&a, &b), 0.0);
        assert!(diff(&a, &c) > 0.0);
    }
}
