//! The decoder's inference pass on the CPU engine's kernels (f32), per image: each block
//! `y = LN1(x)·D̃ᵀ`, `x = y − MSSA(LN2(y))`, then `decoder_norm` and `decoder_pred`. The same
//! products, LayerNorm and per-head attention as the encoder's pass; it must differ in form
//! from [`crate::decoder::DecoderBlock`] (candle's operations), and
//! `fused_cpu_decoder_equals_the_reference_decoder` ties the two.

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::{attention, kernels, Dense, Norm};
use crate::decoder::DecoderBlock;
use crate::device::Precision;
use crate::error::{ModelError, Result};
use crate::ops::{LayerNorm, Linear};

#[derive(Debug)]
struct Block {
    ln1: Norm,
    linear: Dense,
    ln2: Norm,
    qkv: Dense,
    to_out: Dense,
    score_scale: f32,
}

/// One image's working memory.
struct Scratch {
    y: Vec<f32>,
    w: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    scores: Vec<f32>,
    bf16: Vec<u32>,
}

#[derive(Debug)]
pub struct CpuDecoder {
    /// Tokens (1 + patches), width, heads, head width, values per patch.
    n: usize,
    d: usize,
    heads: usize,
    dh: usize,
    patch_dim: usize,
    blocks: Vec<Block>,
    norm: Norm,
    pred: Dense,
}

impl CpuDecoder {
    pub(crate) fn new(
        cfg: &crate::CrateMaeConfig,
        blocks: &[DecoderBlock],
        norm: &LayerNorm,
        pred: &Linear,
    ) -> Result<Self> {
        let f32 = Precision::F32;
        let blocks = blocks
            .iter()
            .map(|b| {
                let (qkv, to_out, score_scale) = b.mssa().parts();
                let to_out = to_out.ok_or_else(|| {
                    ModelError::Config("the CPU decoder needs the output projection".into())
                })?;
                Ok(Block {
                    ln1: Norm::new(b.ln1())?,
                    linear: Dense::new(b.linear(), f32)?,
                    ln2: Norm::new(b.ln2())?,
                    qkv: Dense::new(qkv, f32)?,
                    to_out: Dense::new(to_out, f32)?,
                    score_scale: score_scale as f32,
                })
            })
            .collect::<Result<_>>()?;
        let heads = cfg.decoder_num_heads;
        Ok(Self {
            n: cfg.seq_len(),
            d: cfg.dim,
            heads,
            dh: cfg.dim / heads,
            patch_dim: cfg.patch_dim(),
            blocks,
            norm: Norm::new(norm)?,
            pred: Dense::new(pred, f32)?,
        })
    }

    /// `[B, N, d]` latent (f32, CPU) → `[B, L, patch_dim]`: the prediction of every patch.
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        let (n, d, pd) = (self.n, self.d, self.patch_dim);
        let b = latent.dim(0)?;
        let mut x = latent.flatten_all()?.to_vec1::<f32>()?;
        if x.len() != b * n * d {
            return Err(ModelError::input(format!(
                "the latent must be [B, {n}, {d}], got {:?}",
                latent.dims()
            )));
        }
        let mut pred = vec![0f32; b * (n - 1) * pd];
        let threads = rayon::current_num_threads();
        // Whole images per thread when there are enough; else threads inside the products.
        let inner = if b >= threads { 1 } else { threads };
        // One scratch per task, not per image.
        let pairs = x.chunks_mut(n * d).zip(pred.chunks_mut((n - 1) * pd));
        if inner == 1 {
            pairs
                .collect::<Vec<_>>()
                .into_par_iter()
                .for_each_init(|| self.scratch(1), |sc, (x, out)| self.image(x, out, sc, 1));
        } else {
            let mut sc = self.scratch(inner);
            pairs.for_each(|(x, out)| self.image(x, out, &mut sc, inner));
        }
        Ok(Tensor::from_vec(pred, (b, n - 1, pd), &Device::Cpu)?)
    }

    fn scratch(&self, threads: usize) -> Scratch {
        let nd = self.n * self.d;
        Scratch {
            y: vec![0.0; self.n * self.d.max(self.patch_dim)],
            w: vec![0.0; nd],
            att: vec![0.0; nd],
            tmp: vec![0.0; nd],
            scores: vec![0.0; threads.max(1) * self.n * self.n],
            bf16: vec![],
        }
    }

    fn image(&self, x: &mut [f32], out: &mut [f32], sc: &mut Scratch, threads: usize) {
        let (n, d, pd) = (self.n, self.d, self.patch_dim);
        let nd = n * d;
        for b in &self.blocks {
            // Undo the sparse coding: y = LN1(x)·D̃ᵀ.
            b.ln1.apply(x, &mut sc.y[..nd]);
            b.linear.apply(n, &sc.y, x, false, &mut sc.bf16, threads);
            // Undo the compression: x = y − MSSA(LN2(y)).
            b.ln2.apply(x, &mut sc.y[..nd]);
            b.qkv
                .apply(n, &sc.y, &mut sc.w[..nd], false, &mut sc.bf16, threads);
            attention(
                (n, d, self.heads, self.dh),
                b.score_scale,
                &sc.w,
                &mut sc.att,
                &mut sc.scores,
                threads,
            );
            b.to_out
                .apply(n, &sc.att, &mut sc.tmp[..nd], false, &mut sc.bf16, threads);
            let bias = b.to_out.bias.as_deref();
            for (row, out_row) in x.chunks_mut(d).zip(sc.tmp.chunks(d)) {
                for (j, (v, o)) in row.iter_mut().zip(out_row).enumerate() {
                    *v -= o + bias.map_or(0.0, |b| b[j]);
                }
            }
        }
        self.norm.apply(x, &mut sc.w[..nd]);
        // The prediction of the patch tokens (the cls row is not a patch).
        self.pred
            .apply(n - 1, &sc.w[d..nd], out, false, &mut sc.bf16, threads);
        if let Some(bias) = &self.pred.bias {
            kernels::add_bias(&mut out[..(n - 1) * pd], bias);
        }
    }
}
