//! Multi-head Subspace Self-Attention: the compression step.
//!
//! One bias-free projection `U` gives the subspace coordinates `w = x·Uᵀ`, used as query, key
//! and value alike; per head `A = softmax(w_h w_hᵀ / √dh)` and the output is `concat_h(A w_h)`
//! followed by `to_out`. Its gradient step decreases the coding rate `R^c` of the tokens
//! against the learned subspaces.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops::{softmax_last_dim, Linear};
use crate::taps::Taps;

#[derive(Debug, Clone)]
pub struct Mssa {
    qkv: Linear,
    /// Absent only when one head spans the whole width (never in official configs).
    to_out: Option<Linear>,
    heads: usize,
    scale: f64,
}

impl Mssa {
    pub fn new(dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let dim_head = dim / heads;
        let to_out = if heads == 1 && dim_head == dim {
            None
        } else {
            Some(Linear::new(dim, dim, vb.pp("to_out").pp("0"))?)
        };
        Ok(Self {
            qkv: Linear::no_bias(dim, dim, vb.pp("qkv"))?,
            to_out,
            heads,
            scale: (dim_head as f64).powf(-0.5),
        })
    }

    /// `x` is already layer-normalised: `[B, N, d]` → `[B, N, d]`.
    pub fn forward(&self, x: &Tensor, scope: &str, taps: &mut Taps) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let w = self.qkv.forward(x)?;
        taps.record(scope, "qkv", &w);
        let w = w
            .reshape((b, n, self.heads, d / self.heads))?
            .transpose(1, 2)?
            .contiguous()?; // [B, H, N, dh]
        let scores = (w.matmul(&w.t()?)? * self.scale)?;
        let attn = softmax_last_dim(&scores)?;
        taps.record(scope, "attn", &attn);
        let out = attn.matmul(&w)?.transpose(1, 2)?.reshape((b, n, d))?;
        match &self.to_out {
            Some(to_out) => to_out.forward(&out),
            None => Ok(out),
        }
    }
}
