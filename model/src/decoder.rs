//! One CRATE decoder layer: the encoder layer run backwards.
//!
//! A linear map undoes the sparse coding (`y = LN1(x)·D̃ᵀ`, no bias, no ReLU), then a *minus*
//! MSSA step undoes the compression: `out = y − MSSA(LN2(y))`.
//! Checkpoint paths: `decoder_blocks.{i}.layers.0.0.{norm,fn}` (linear) and
//! `decoder_blocks.{i}.layers.0.1.{norm,fn}` (MSSA).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::CrateMaeConfig;
use crate::mssa::Mssa;
use crate::ops::{LayerNorm, Linear};

#[derive(Debug, Clone)]
pub struct DecoderBlock {
    ln1: LayerNorm,
    linear: Linear,
    ln2: LayerNorm,
    mssa: Mssa,
}

/// Every intermediate of one decoder layer (the golden vectors' names).
#[derive(Debug, Clone)]
pub struct DecoderBlockTrace {
    pub ln1: Tensor,
    pub lin: Tensor,
    pub ln2: Tensor,
    pub qkv: Tensor,
    pub attn: Tensor,
    pub mssa: Tensor,
    pub out: Tensor,
}

impl DecoderBlock {
    pub fn new(cfg: &CrateMaeConfig, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (cfg.dim, cfg.prenorm_ln_eps);
        let (lin, attn) = (vb.pp("layers.0.0"), vb.pp("layers.0.1"));
        Ok(Self {
            ln1: LayerNorm::new(d, eps, lin.pp("norm"))?,
            linear: Linear::no_bias(d, d, lin.pp("fn"))?,
            ln2: LayerNorm::new(d, eps, attn.pp("norm"))?,
            mssa: Mssa::new(d, cfg.decoder_num_heads, attn.pp("fn"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Undo the sparse coding, then undo the compression.
        let y = self.linear.forward(&self.ln1.forward(x)?)?;
        &y - self.mssa.forward(&self.ln2.forward(&y)?)?
    }

    /// [`DecoderBlock::forward`], keeping every intermediate.
    pub fn trace(&self, x: &Tensor) -> Result<DecoderBlockTrace> {
        let ln1 = self.ln1.forward(x)?;
        let lin = self.linear.forward(&ln1)?;
        let ln2 = self.ln2.forward(&lin)?;
        let mssa = self.mssa.trace(&ln2)?;
        let out = (&lin - &mssa.out)?;
        Ok(DecoderBlockTrace {
            ln1,
            lin,
            ln2,
            qkv: mssa.qkv,
            attn: mssa.attn,
            mssa: mssa.out,
            out,
        })
    }

    pub fn ln1(&self) -> &LayerNorm {
        &self.ln1
    }

    pub fn linear(&self) -> &Linear {
        &self.linear
    }

    pub fn ln2(&self) -> &LayerNorm {
        &self.ln2
    }

    pub fn mssa(&self) -> &Mssa {
        &self.mssa
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            ln1: self.ln1.to_dtype(dtype)?,
            linear: self.linear.to_dtype(dtype)?,
            ln2: self.ln2.to_dtype(dtype)?,
            mssa: self.mssa.to_dtype(dtype)?,
        })
    }
}
