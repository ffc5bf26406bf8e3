//! Patch embedding, and the pixel layouts that go with patches.
//!
//! The official `PatchEmbed` is a Conv2d with kernel = stride = p. That is one matmul of each
//! patch, flattened in (c, ki, kj) order, against `proj.weight` viewed as `[d, C·p²]`.
//! `patchify`/`unpatchify` use the MAE pixel order (ki, kj, c) instead, as the loss and the
//! prediction head do. Patches are numbered row-major: `l = i·g + j`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops::Linear;

#[derive(Debug, Clone)]
pub struct PatchEmbed {
    proj: Linear,
    patch_size: usize,
}

impl PatchEmbed {
    pub fn new(in_chans: usize, patch_size: usize, dim: usize, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("proj");
        let weight = vb
            .get((dim, in_chans, patch_size, patch_size), "weight")?
            .reshape((dim, in_chans * patch_size * patch_size))?;
        let bias = vb.get(dim, "bias")?;
        Ok(Self {
            proj: Linear::with_bias(weight, bias),
            patch_size,
        })
    }

    pub fn to_dtype(&self, dtype: candle_core::DType) -> Result<Self> {
        Ok(Self {
            proj: self.proj.to_dtype(dtype)?,
            patch_size: self.patch_size,
        })
    }

    /// The projection as a `[d, C·p²]` map over (c, ki, kj)-ordered patch pixels.
    pub fn projection(&self) -> &Linear {
        &self.proj
    }

    pub fn patch_size(&self) -> usize {
        self.patch_size
    }

    /// `[B, C, S, S]` → `[B, L, d]`.
    pub fn forward(&self, images: &Tensor) -> Result<Tensor> {
        let p = self.patch_size;
        let (b, c, h, w) = images.dims4()?;
        let (gh, gw) = (h / p, w / p);
        let patches = images
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))? // b, i, j, c, ki, kj
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        self.proj.forward(&patches)
    }
}

/// `[B, C, S, S]` → `[B, L, p²·C]` in (ki, kj, c) order.
pub fn patchify(images: &Tensor, patch_size: usize) -> Result<Tensor> {
    let p = patch_size;
    let (b, c, h, w) = images.dims4()?;
    let (gh, gw) = (h / p, w / p);
    images
        .reshape((b, c, gh, p, gw, p))?
        .permute((0, 2, 4, 3, 5, 1))? // b, i, j, ki, kj, c
        .contiguous()?
        .reshape((b, gh * gw, p * p * c))
}

/// Inverse of [`patchify`] for a square grid: `[B, L, p²·C]` → `[B, C, S, S]`.
pub fn unpatchify(patches: &Tensor, patch_size: usize, in_chans: usize) -> Result<Tensor> {
    let p = patch_size;
    let (b, l, _) = patches.dims3()?;
    let g = (l as f64).sqrt().round() as usize;
    if g * g != l {
        candle_core::bail!("unpatchify needs a square number of patches, got {l}");
    }
    patches
        .reshape((b, g, g, p, p, in_chans))?
        .permute((0, 5, 1, 3, 2, 4))? // b, c, i, ki, j, kj
        .contiguous()?
        .reshape((b, in_chans, g * p, g * p))
}

/// The fixed 2-D sin-cos table of the official code, `[1 + g², d]` with a zero cls row. The
/// first half of each row encodes the patch's column, the second half its row.
pub fn sincos_pos_embed(dim: usize, grid: usize) -> Vec<f32> {
    let half = dim / 2;
    let quarter = half / 2;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / (half as f64 / 2.0)))
        .collect();
    let mut table = vec![0f32; (1 + grid * grid) * dim];
    for i in 0..grid {
        for j in 0..grid {
            let row = &mut table[(1 + i * grid + j) * dim..][..dim];
            for (offset, pos) in [(0, j as f64), (half, i as f64)] {
                for (k, w) in omega.iter().enumerate() {
                    // numpy computes the product in float64, then the table is cast to f32.
                    let angle = pos * w;
                    row[offset + k] = angle.sin() as f32;
                    row[offset + quarter + k] = angle.cos() as f32;
                }
            }
        }
    }
    table
}
