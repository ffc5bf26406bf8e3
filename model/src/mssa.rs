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
    /// The softmax scale `dh^-½` still to apply to the scores; 1 when it is folded into the
    /// weights (see [`Mssa::new`]).
    score_scale: f64,
    /// Factor by which `qkv` outputs are pre-scaled (`dh^-¼` when folded, else 1).
    qkv_scale: f64,
}

impl Mssa {
    pub fn new(dim: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        let dim_head = dim / heads;
        let to_out = if heads == 1 && dim_head == dim {
            None
        } else {
            Some(Linear::new(dim, dim, vb.pp("to_out").pp("0"))?)
        };
        let qkv = Linear::no_bias(dim, dim, vb.pp("qkv"))?;
        let scale = (dim_head as f64).powf(-0.5);
        // Inference: (s·w)(s·w)ᵀ = s²·wwᵀ, so scaling U by s = dh^-¼ puts the softmax scale in
        // the weights; the value path then carries a factor s, undone in `to_out`'s weight
        // (linear, before the bias). Saves a pass over the [B, H, N, N] scores per layer.
        // Trained weights change under us, so training keeps the explicit scale.
        let fold = !qkv.weight().track_op() && to_out.is_some();
        if !fold {
            return Ok(Self {
                qkv,
                to_out,
                heads,
                score_scale: scale,
                qkv_scale: 1.0,
            });
        }
        let s = scale.sqrt();
        let to_out = to_out.map(|o| o.scaled_weight(1.0 / s)).transpose()?;
        Ok(Self {
            qkv: qkv.scaled_weight(s)?,
            to_out,
            heads,
            score_scale: 1.0,
            qkv_scale: s,
        })
    }

    /// `x` is already layer-normalised: `[B, N, d]` → `[B, N, d]`.
    pub fn forward(&self, x: &Tensor, scope: &str, taps: &mut Taps) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let w = self.qkv.forward(x)?;
        if !taps.is_off() && taps.wants(&format!("{scope}.qkv")) {
            // Recorded unscaled, as the official `qkv` output.
            taps.record(scope, "qkv", &(&w / self.qkv_scale)?);
        }
        let w = w
            .reshape((b, n, self.heads, d / self.heads))?
            .transpose(1, 2)?
            .contiguous()?; // [B, H, N, dh]
        let mut scores = w.matmul(&w.t()?)?;
        if self.score_scale != 1.0 {
            scores = (scores * self.score_scale)?;
        }
        let attn = softmax_last_dim(&scores)?;
        taps.record(scope, "attn", &attn);
        let out = attn.matmul(&w)?.transpose(1, 2)?.reshape((b, n, d))?;
        match &self.to_out {
            Some(to_out) => to_out.forward(&out),
            None => Ok(out),
        }
    }
}
