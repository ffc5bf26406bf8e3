//! Multi-head Subspace Self-Attention: the compression step.
//!
//! One bias-free projection `U` gives the subspace coordinates `w = x·Uᵀ`, used as query, key
//! and value alike; per head `A = softmax(w_h w_hᵀ / √dh)` and the output is `concat_h(A w_h)`
//! followed by `to_out`. Its gradient step decreases the coding rate `R^c` of the tokens
//! against the learned subspaces.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops::{softmax_last_dim, Linear};

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

/// Everything one MSSA step computes, for parity tests and diagnostics.
#[derive(Debug, Clone)]
pub struct MssaTrace {
    /// `U^T x`, unscaled as the official `qkv` output: `[B, N, d]`.
    pub qkv: Tensor,
    /// Attention probabilities `[B, H, N, N]`.
    pub attn: Tensor,
    /// The step's output `[B, N, d]`.
    pub out: Tensor,
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

    pub fn heads(&self) -> usize {
        self.heads
    }

    /// `[B, N, d]` → `[B, H, N, dh]` subspace coordinates (pre-scaled when folded).
    fn coordinates(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, n, d) = x.dims3()?;
        let w = self.qkv.forward(x)?;
        let heads = w
            .reshape((b, n, self.heads, d / self.heads))?
            .transpose(1, 2)?
            .contiguous()?;
        Ok((w, heads))
    }

    fn attention(&self, w: &Tensor) -> Result<Tensor> {
        let scores = w.matmul(&w.t()?)?;
        let scores = if self.score_scale != 1.0 {
            (scores * self.score_scale)?
        } else {
            scores
        };
        softmax_last_dim(&scores)
    }

    /// `concat_h(A_h w_h)` then `to_out`.
    fn project_out(&self, attn: &Tensor, w: &Tensor) -> Result<Tensor> {
        let (b, _, n, _) = w.dims4()?;
        let out = attn.matmul(w)?.transpose(1, 2)?.reshape((b, n, ()))?;
        match &self.to_out {
            Some(to_out) => to_out.forward(&out),
            None => Ok(out),
        }
    }

    /// `x` is already layer-normalised: `[B, N, d]` → `[B, N, d]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, w) = self.coordinates(x)?;
        self.project_out(&self.attention(&w)?, &w)
    }

    /// [`Mssa::forward`], keeping the projection and the attention map.
    pub fn trace(&self, x: &Tensor) -> Result<MssaTrace> {
        let (flat, w) = self.coordinates(x)?;
        let attn = self.attention(&w)?;
        Ok(MssaTrace {
            qkv: (flat / self.qkv_scale)?,
            out: self.project_out(&attn, &w)?,
            attn,
        })
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            qkv: self.qkv.to_dtype(dtype)?,
            to_out: self
                .to_out
                .as_ref()
                .map(|o| o.to_dtype(dtype))
                .transpose()?,
            ..self.clone()
        })
    }

    /// The pre-scaled projection and the output map, for kernels that fuse this step.
    pub fn parts(&self) -> (&Linear, Option<&Linear>, f64) {
        (&self.qkv, self.to_out.as_ref(), self.score_scale)
    }
}
