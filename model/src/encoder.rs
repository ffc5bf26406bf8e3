//! One CRATE encoder layer: compress with MSSA, then sparsify with ISTA.
//!
//! `z = x + MSSA(LN1(x))`, `out = ISTA(LN2(z))` (no residual around ISTA).
//! Checkpoint paths: `blocks.{i}.layers.0.0.{norm,fn}` (MSSA) and `blocks.{i}.layers.0.1.{norm,fn}`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::CrateMaeConfig;
use crate::ista::Ista;
use crate::mssa::Mssa;
use crate::ops::LayerNorm;
use crate::taps::Taps;

#[derive(Debug, Clone)]
pub struct EncoderBlock {
    ln1: LayerNorm,
    mssa: Mssa,
    ln2: LayerNorm,
    ista: Ista,
    /// Tap scope, `enc.{i}`.
    scope: String,
}

impl EncoderBlock {
    pub fn new(cfg: &CrateMaeConfig, index: usize, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (cfg.dim, cfg.prenorm_ln_eps);
        let (attn, sparse) = (vb.pp("layers.0.0"), vb.pp("layers.0.1"));
        Ok(Self {
            ln1: LayerNorm::new(d, eps, attn.pp("norm"))?,
            mssa: Mssa::new(d, cfg.heads, attn.pp("fn"))?,
            ln2: LayerNorm::new(d, eps, sparse.pp("norm"))?,
            ista: Ista::new(d, cfg.ista_step_size, cfg.lambd, sparse.pp("fn"))?,
            scope: format!("enc.{index}"),
        })
    }

    pub fn forward(&self, x: &Tensor, taps: &mut Taps) -> Result<Tensor> {
        let s = self.scope.as_str();
        let ln1 = self.ln1.forward(x)?;
        taps.record(s, "ln1", &ln1);
        let mssa = self.mssa.forward(&ln1, s, taps)?;
        taps.record(s, "mssa", &mssa);
        let z = (x + mssa)?;
        taps.record(s, "z_half", &z);
        let ln2 = self.ln2.forward(&z)?;
        taps.record(s, "ln2", &ln2);
        let out = self.ista.forward(&ln2)?;
        taps.record(s, "out", &out);
        Ok(out)
    }

    pub fn ista(&self) -> &Ista {
        &self.ista
    }
}
