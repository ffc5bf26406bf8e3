//! Model configuration: the official builders' sizes plus anything custom.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// ImageNet statistics, used by the official checkpoints.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Everything that determines the shapes and arithmetic of a CRATE-MAE.
///
/// Field names follow the official constructor (`img_size`, `patch_size`, `lambd`, ...), so a
/// golden `config.json` or a model card deserialises directly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CrateMaeConfig {
    pub img_size: usize,
    pub patch_size: usize,
    pub in_chans: usize,
    /// Token width d (`embed_dim`).
    pub dim: usize,
    /// Encoder blocks.
    pub depth: usize,
    pub heads: usize,
    /// Decoder blocks (the official builders use `depth`).
    pub decoder_depth: usize,
    pub decoder_num_heads: usize,
    /// ISTA step size η.
    pub ista_step_size: f64,
    /// ISTA sparsity weight λ.
    pub lambd: f64,
    /// LayerNorm eps inside the blocks (PyTorch default).
    pub prenorm_ln_eps: f64,
    /// LayerNorm eps of `norm` and `decoder_norm`.
    pub final_ln_eps: f64,
    /// Train against per-patch normalised pixels.
    pub norm_pix_loss: bool,
    /// Per-channel normalisation the weights were trained with.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Default for CrateMaeConfig {
    fn default() -> Self {
        Self::base()
    }
}

impl CrateMaeConfig {
    fn official(dim: usize, depth: usize, heads: usize) -> Self {
        Self {
            img_size: 224,
            patch_size: 16,
            in_chans: 3,
            dim,
            depth,
            heads,
            decoder_depth: depth,
            decoder_num_heads: heads,
            ista_step_size: 0.1,
            lambd: 0.5,
            prenorm_ln_eps: 1e-5,
            final_ln_eps: 1e-6,
            norm_pix_loss: false,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// `mae_crate_tiny`: d 384, 12 + 12 blocks, 6 heads.
    pub fn tiny() -> Self {
        Self::official(384, 12, 6)
    }
    /// `mae_crate_small`: d 576, 12 + 12 blocks, 12 heads.
    pub fn small() -> Self {
        Self::official(576, 12, 12)
    }
    /// `mae_crate_base`: d 768, 12 + 12 blocks, 12 heads.
    pub fn base() -> Self {
        Self::official(768, 12, 12)
    }
    /// `mae_crate_large`: d 1024, 24 + 24 blocks, 16 heads.
    pub fn large() -> Self {
        Self::official(1024, 24, 16)
    }

    /// The shape of the server's built-in Fashion-MNIST model (d 128, depth 4 + 4, 4 heads,
    /// 32 px, patch 4), for benchmarks and tests that want it without its weights.
    pub fn built_in_shape() -> Self {
        Self {
            img_size: 32,
            patch_size: 4,
            dim: 128,
            depth: 4,
            heads: 4,
            decoder_depth: 4,
            decoder_num_heads: 4,
            ..Self::tiny()
        }
    }

    /// The official preset by name (`tiny`, `small`, `base`, `large`).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "small" => Ok(Self::small()),
            "base" => Ok(Self::base()),
            "large" => Ok(Self::large()),
            other => Err(ModelError::Config(format!(
                "unknown preset `{other}` (expected tiny, small, base or large)"
            ))),
        }
    }

    /// Heads of the official preset with this width, used when a checkpoint alone is given
    /// (head count cannot be read off the tensor shapes: `qkv` is always `[d, d]`).
    pub fn official_heads_for_dim(dim: usize) -> Option<usize> {
        match dim {
            384 => Some(6),
            576 | 768 => Some(12),
            1024 => Some(16),
            _ => None,
        }
    }

    pub fn grid_size(&self) -> usize {
        self.img_size / self.patch_size
    }
    /// L, the number of patches.
    pub fn num_patches(&self) -> usize {
        self.grid_size() * self.grid_size()
    }
    /// N = 1 + L tokens (cls first).
    pub fn seq_len(&self) -> usize {
        1 + self.num_patches()
    }
    pub fn dim_head(&self) -> usize {
        self.dim / self.heads
    }
    /// Length of one patch's pixel vector, p²·C.
    pub fn patch_dim(&self) -> usize {
        self.patch_size * self.patch_size * self.in_chans
    }

    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(ModelError::Config(m));
        if self.patch_size == 0
            || self.img_size == 0
            || !self.img_size.is_multiple_of(self.patch_size)
        {
            return fail(format!(
                "img_size {} must be a positive multiple of patch_size {}",
                self.img_size, self.patch_size
            ));
        }
        if self.in_chans == 0 || self.dim == 0 {
            return fail("in_chans and dim must be positive".into());
        }
        for (what, heads) in [
            ("heads", self.heads),
            ("decoder_num_heads", self.decoder_num_heads),
        ] {
            if heads == 0 || !self.dim.is_multiple_of(heads) {
                return fail(format!(
                    "dim {} is not divisible by {what} {heads}",
                    self.dim
                ));
            }
        }
        if self.depth == 0 {
            return fail("depth must be at least 1".into());
        }
        for (what, v) in [
            ("ista_step_size", self.ista_step_size),
            ("lambd", self.lambd),
            ("prenorm_ln_eps", self.prenorm_ln_eps),
            ("final_ln_eps", self.final_ln_eps),
        ] {
            if !v.is_finite() || v < 0.0 {
                return fail(format!("{what} must be finite and non-negative, got {v}"));
            }
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return fail(format!("std must be positive, got {:?}", self.std));
        }
        Ok(())
    }

    /// Forward FLOPs of the encoder for one image, counted as the paper does (2 per
    /// multiply-add, three-matmul ISTA): patch embedding `2·L·C·p²·d` plus
    /// `depth · (10·N·d² + 4·N²·d)`. Base: 15.605 GFLOPs.
    pub fn encoder_flops_per_image(&self) -> f64 {
        let (n, d) = (self.seq_len() as f64, self.dim as f64);
        let embed = 2.0
            * self.num_patches() as f64
            * (self.in_chans * self.patch_size * self.patch_size) as f64
            * d;
        embed + self.depth as f64 * (10.0 * n * d * d + 4.0 * n * n * d)
    }

    /// Forward FLOPs of the decoder (linear map, MSSA, prediction head) for one image.
    pub fn decoder_flops_per_image(&self) -> f64 {
        let (n, d, pd) = (
            self.seq_len() as f64,
            self.dim as f64,
            self.patch_dim() as f64,
        );
        self.decoder_depth as f64 * (6.0 * n * d * d + 4.0 * n * n * d) + 2.0 * n * d * pd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_match_the_paper_parameter_counts() {
        // Millions of parameters from the official builders (crate-mae.md, "Configurations").
        for (cfg, millions) in [
            (CrateMaeConfig::tiny(), 11.56),
            (CrateMaeConfig::small(), 25.4),
            (CrateMaeConfig::base(), 44.6),
            (CrateMaeConfig::large(), 154.3),
        ] {
            let got = cfg.parameter_count() as f64 / 1e6;
            assert!((got - millions).abs() < 0.06, "{got} vs {millions}");
        }
    }

    #[test]
    fn base_encoder_flops_are_the_official_figure() {
        let gflops = CrateMaeConfig::base().encoder_flops_per_image() / 1e9;
        assert!((gflops - 15.605).abs() < 0.001, "{gflops}");
    }

    #[test]
    fn validation_rejects_inconsistent_sizes() {
        let mut cfg = CrateMaeConfig::tiny();
        cfg.heads = 7;
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("divisible"));
        let mut cfg = CrateMaeConfig::tiny();
        cfg.img_size = 225;
        assert!(cfg.validate().is_err());
    }
}
