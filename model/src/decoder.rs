//! One CRATE decoder layer: the encoder layer run backwards.
//!
//! A linear map undoes the sparse coding (`y = LN1(x)·D̃ᵀ`, no bias, no ReLU), then a *minus*
//! MSSA step undoes the compression: `out = y − MSSA(LN2(y))`.
//! Checkpoint paths: `decoder_blocks.{i}.layers.0.0.{norm,fn}` (linear) and
//! `decoder_blocks.{i}.layers.0.1.{norm,fn}` (MSSA).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::CrateMaeConfig;
use crate::mssa::Mssa;
use crate::ops::{LayerNorm, Linear};
use crate::taps::Taps;

#[derive(Debug, Clone)]
pub struct DecoderBlock {
    ln1: LayerNorm,
    linear: Linear,
    ln2: LayerNorm,
    mssa: Mssa,
    /// Tap scope, `dec.{i}`.
    scope: String,
}

impl DecoderBlock {
    pub fn new(cfg: &CrateMaeConfig, index: usize, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (cfg.dim, cfg.prenorm_ln_eps);
        let (lin, attn) = (vb.pp("layers.0.0"), vb.pp("layers.0.1"));
        Ok(Self {
            ln1: LayerNorm::new(d, eps, lin.pp("norm"))?,
            linear: Linear::no_bias(d, d, lin.pp("fn"))?,
            ln2: LayerNorm::new(d, eps, attn.pp("norm"))?,
            mssa: Mssa::new(d, cfg.decoder_num_heads, attn.pp("fn"))?,
            scope: format!("dec.{index}"),
        })
    }

    pub fn forward(&self, x: &Tensor, taps: &mut Taps) -> Result<Tensor> {
        let s = self.scope.as_str();
        let ln1 = self.ln1.forward(x)?;
        taps.record(s, "ln1", &ln1);
        let y = self.linear.forward(&ln1)?;
        taps.record(s, "lin", &y);
        let ln2 = self.ln2.forward(&y)?;
        taps.record(s, "ln2", &ln2);
        let mssa = self.mssa.forward(&ln2, s, taps)?;
        taps.record(s, "mssa", &mssa);
        let out = (y - mssa)?;
        taps.record(s, "out", &out);
        Ok(out)
    }
}
