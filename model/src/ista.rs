//! Iterative Shrinkage-Thresholding: the sparsification step.
//!
//! One proximal-gradient step of `min λ‖z‖₁ + ½‖x − Dz‖²` started at `z = x`, with tokens as
//! row vectors and `D` = `fn.weight`:
//!
//! `ISTA(n) = ReLU(n + η(n·D − n·Dᵀ·D) − ηλ)`
//!
//! which is `ReLU(n·M − ηλ)` with `M = I + η(D − DᵀD)`. Inference uses the fused form with `M`
//! precomputed once at load (one matmul instead of three) and does not keep `D` (it is a
//! sixth of a model's weights); training uses the three-matmul form so gradients reach `D`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops::{shrink_relu, Linear};

#[derive(Debug, Clone)]
pub struct Ista {
    /// `D`, while it is being trained.
    dictionary: Option<Tensor>,
    /// `M = I + η(D − DᵀD)`; `None` when `D` is being trained.
    fused: Option<Linear>,
    step_size: f64,
    threshold: f64,
}

impl Ista {
    pub fn new(dim: usize, step_size: f64, lambd: f64, vb: VarBuilder) -> Result<Self> {
        let dictionary = vb.get((dim, dim), "weight")?;
        let (dictionary, fused) = if dictionary.track_op() {
            (Some(dictionary), None)
        } else {
            let m = Self::fused_matrix(&dictionary, step_size)?.t()?;
            (None, Some(Linear::from_weight(m)))
        };
        Ok(Self {
            dictionary,
            fused,
            step_size,
            threshold: step_size * lambd,
        })
    }

    /// `M = I + η(D − DᵀD)`, computed in f64 so the fused path only adds its own rounding.
    fn fused_matrix(d: &Tensor, step_size: f64) -> Result<Tensor> {
        let dtype = d.dtype();
        let d64 = d.to_dtype(DType::F64)?;
        let dim = d.dim(0)?;
        let eye = Tensor::eye(dim, DType::F64, d.device())?;
        let m = (eye + ((&d64 - d64.t()?.matmul(&d64)?)? * step_size)?)?;
        m.to_dtype(dtype)
    }

    /// The official three-matmul form: `x1 = n·Dᵀ`, `grad_1 = x1·D`, `grad_2 = n·D` (training:
    /// inference keeps only `M`).
    pub fn forward_three_matmul(&self, n: &Tensor) -> Result<Tensor> {
        let Some(dictionary) = &self.dictionary else {
            candle_core::bail!("the three-matmul ISTA needs the dictionary, kept only for training")
        };
        let d = Linear::from_weight(dictionary.clone());
        let d_t = Linear::from_weight(dictionary.t()?);
        let grad_1 = d_t.forward(&d.forward(n)?)?;
        let grad_2 = d_t.forward(n)?;
        let update = (((grad_2 - grad_1)? * self.step_size)? - self.threshold)?;
        (n + update)?.relu()
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            dictionary: self
                .dictionary
                .as_ref()
                .map(|d| d.to_dtype(dtype))
                .transpose()?,
            fused: self.fused.as_ref().map(|m| m.to_dtype(dtype)).transpose()?,
            ..self.clone()
        })
    }

    /// `M` as a map (`None` while training), and the threshold `ηλ`, for fused kernels.
    pub fn fused(&self) -> Option<(&Linear, f64)> {
        self.fused.as_ref().map(|m| (m, self.threshold))
    }

    /// `ReLU(n·M − ηλ)`; falls back to the three-matmul form while training.
    pub fn forward(&self, n: &Tensor) -> Result<Tensor> {
        match &self.fused {
            Some(m) if !n.track_op() => shrink_relu(&m.forward(n)?, self.threshold),
            _ => self.forward_three_matmul(n),
        }
    }
}
