//! The small building blocks every operator uses: LayerNorm, Linear, softmax.
//!
//! At inference they run candle's fused kernels; those have no backward pass, so when a tensor
//! tracks gradients (training) the composed, differentiable forms are used instead.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::VarBuilder;

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps: eps as f32,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn eps(&self) -> f32 {
        self.eps
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: self.weight.to_dtype(dtype)?,
            bias: self.bias.to_dtype(dtype)?,
            eps: self.eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() || self.weight.track_op() {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps)
        } else {
            candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps)
        }
    }
}

/// `y = x·Wᵀ + b` with W stored `[out, in]` as PyTorch does.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_dim, in_dim), "weight")?,
            bias: Some(vb.get(out_dim, "bias")?),
        })
    }

    pub fn no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_dim, in_dim), "weight")?,
            bias: None,
        })
    }

    pub fn with_bias(weight: Tensor, bias: Tensor) -> Self {
        Self {
            weight,
            bias: Some(bias),
        }
    }

    /// A bias-free map from a bare `[out, in]` parameter (the ISTA dictionary, the decoder's
    /// linear step), used through `F.linear` in the official code.
    pub fn from_weight(weight: Tensor) -> Self {
        Self { weight, bias: None }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The same map with its weight (not its bias) multiplied by `factor`.
    pub fn scaled_weight(&self, factor: f64) -> Result<Self> {
        Ok(Self {
            weight: (&self.weight * factor)?,
            bias: self.bias.clone(),
        })
    }

    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(Self {
            weight: self.weight.to_dtype(dtype)?,
            bias: self.bias.as_ref().map(|b| b.to_dtype(dtype)).transpose()?,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // One large GEMM over all tokens of all images: [B·N, in] x [in, out]. candle's
        // broadcast (batched) matmul would run B small GEMMs instead.
        let (out_dim, in_dim) = self.weight.dims2()?;
        let mut dims = x.dims().to_vec();
        let rows = x.elem_count() / in_dim;
        let y = x.reshape((rows, in_dim))?.matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        *dims.last_mut().expect("linear input has at least one dim") = out_dim;
        y.reshape(dims)
    }
}

pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// `max(x − t, 0)`: ISTA's shrinkage and ReLU in one pass on the CPU (two elementwise passes,
/// each allocating a `[B, N, d]` tensor, otherwise). Differentiable composed ops elsewhere.
pub fn shrink_relu(x: &Tensor, threshold: f64) -> Result<Tensor> {
    if x.device().is_cpu() && !x.track_op() && x.dtype() == DType::F32 {
        x.apply_op1_no_bwd(&ShrinkRelu(threshold as f32))
    } else {
        (x - threshold)?.relu()
    }
}

struct ShrinkRelu(f32);

impl CustomOp1 for ShrinkRelu {
    fn name(&self) -> &'static str {
        "shrink-relu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("shrink-relu: f32 only")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("shrink-relu: contiguous input only")
        };
        let t = self.0;
        let out: Vec<f32> = data[start..end].iter().map(|&v| (v - t).max(0.0)).collect();
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}
