//! One CRATE encoder layer: compress with MSSA, then sparsify with ISTA.
//!
//! `z = x + MSSA(LN1(x))`, `out = ISTA(LN2(z))` (no residual around ISTA).
//! Checkpoint paths: `blocks.{i}.layers.0.0.{norm,fn}` (MSSA) and `blocks.{i}.layers.0.1.{norm,fn}`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::CrateMaeConfig;
use crate::ista::Ista;
use crate::mssa::Mssa;
use crate::ops::LayerNorm;

#[derive(Debug, Clone)]
pub struct EncoderBlock {
    ln1: LayerNorm,
    mssa: Mssa,
    ln2: LayerNorm,
    ista: Ista,
}

/// Every intermediate of one encoder layer (the golden vectors' names).
#[derive(Debug, Clone)]
pub struct EncoderBlockTrace {
    pub ln1: Tensor,
    /// `U^T LN1(x)`, what the coding rate `R^c` measures.
    pub qkv: Tensor,
    pub attn: Tensor,
    pub mssa: Tensor,
    /// `x + MSSA(LN1(x))`.
    pub z_half: Tensor,
    pub ln2: Tensor,
    pub out: Tensor,
}

impl EncoderBlock {
    pub fn new(cfg: &CrateMaeConfig, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (cfg.dim, cfg.prenorm_ln_eps);
        let (attn, sparse) = (vb.pp("layers.0.0"), vb.pp("layers.0.1"));
        Ok(Self {
            ln1: LayerNorm::new(d, eps, attn.pp("norm"))?,
            mssa: Mssa::new(d, cfg.heads, attn.pp("fn"))?,
            ln2: LayerNorm::new(d, eps, sparse.pp("norm"))?,
            ista: Ista::new(d, cfg.ista_step_size, cfg.lambd, sparse.pp("fn"))?,
        })
    }

    /// Compression, given `MSSA(LN1(x))`: a gradient step on the coding rate against the
    /// learned subspaces, `z = x + MSSA(LN1(x))`.
    fn compress(x: &Tensor, mssa: &Tensor) -> Result<Tensor> {
        x + mssa
    }

    /// Sparsification: one proximal step towards a sparse code in the dictionary,
    /// `ISTA(LN2(z))` (no residual). Returns `LN2(z)` too.
    fn sparsify(&self, z: &Tensor) -> Result<(Tensor, Tensor)> {
        let ln2 = self.ln2.forward(z)?;
        let out = self.ista.forward(&ln2)?;
        Ok((ln2, out))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let z = Self::compress(x, &self.mssa.forward(&self.ln1.forward(x)?)?)?;
        Ok(self.sparsify(&z)?.1)
    }

    /// [`EncoderBlock::forward`], keeping every intermediate.
    pub fn trace(&self, x: &Tensor) -> Result<EncoderBlockTrace> {
        let ln1 = self.ln1.forward(x)?;
        let mssa = self.mssa.trace(&ln1)?;
        let z_half = Self::compress(x, &mssa.out)?;
        let (ln2, out) = self.sparsify(&z_half)?;
        Ok(EncoderBlockTrace {
            ln1,
            qkv: mssa.qkv,
            attn: mssa.attn,
            mssa: mssa.out,
            z_half,
            ln2,
            out,
        })
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            ln1: self.ln1.to_dtype(dtype)?,
            mssa: self.mssa.to_dtype(dtype)?,
            ln2: self.ln2.to_dtype(dtype)?,
            ista: self.ista.to_dtype(dtype)?,
        })
    }

    pub fn ln1(&self) -> &LayerNorm {
        &self.ln1
    }

    pub fn mssa(&self) -> &Mssa {
        &self.mssa
    }

    pub fn ln2(&self) -> &LayerNorm {
        &self.ln2
    }

    pub fn ista(&self) -> &Ista {
        &self.ista
    }
}
