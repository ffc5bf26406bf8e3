//! White-box diagnostics: what each encoder layer does to the rate-reduction objective.
//!
//! Per encoder layer `i` and per image:
//! - **coding rate** `R^c` (the compression term, exactly the official `CodingRate`, ε² = 0.01):
//!   `Σ_h ½ logdet(I_N + dh/(N ε²) X_h X_hᵀ)`, `X_h` = head `h` of `qkv(LN1(z))` (the MSSA
//!   input projected on that head's subspace) with every token scaled to unit length;
//! - **expansion rate** `R` of the MSSA input tokens themselves, `Z = LN1(z)` with unit-length
//!   tokens: `½ logdet(I + d/(N ε²) Z Zᵀ)` (not in the official code);
//! - **rate reduction** `ΔR = R − R^c`;
//! - **sparsity**: fraction of exact zeros in the ISTA output (official `cal_sparsity`).
//!
//! `R` and `R^c` are each computed as defined, but not on a common scale: `R^c` sums one term
//! per head over per-head unit-length projections, `R` is one term over whole unit-length
//! tokens. LayerNorm outputs share a strong common direction, so `R` is small and `ΔR` is
//! negative on in-domain data for trained models (the built-in model: −89 to −59 per
//! layer). ΔR here is a drift signal to compare with its own in-domain reference, not the
//! paper's objective value, and its sign carries no meaning on its own.
//!
//! Cost: the Gram matrices are batched matmuls on the model's device (`N·k²` per head with
//! `k = min(N, dh)`, plus `N²·d` for `R`), then a `k×k` Cholesky per head in f64 on the host.
//! The server samples batches so the cost stays bounded.

use candle_core::{DType, Tensor, D};
use nalgebra::DMatrix;
use rayon::prelude::*;

use crate::config::CrateMaeConfig;
use crate::encoder::EncoderBlockTrace;
use crate::error::{ModelError, Result};

/// ε² of the official `CodingRate`.
pub const CODING_RATE_EPS: f64 = 0.01;

#[derive(Debug, Clone, PartialEq)]
pub struct LayerDiagnostics {
    pub layer: usize,
    /// `R^c` per image.
    pub coding_rate: Vec<f64>,
    /// `R` per image.
    pub expansion_rate: Vec<f64>,
    /// Fraction of exact zeros of the ISTA output, per image.
    pub sparsity: Vec<f64>,
}

impl LayerDiagnostics {
    /// `ΔR = R − R^c` per image.
    pub fn rate_reduction(&self) -> Vec<f64> {
        self.expansion_rate
            .iter()
            .zip(&self.coding_rate)
            .map(|(r, rc)| r - rc)
            .collect()
    }
}

/// Batch mean and unbiased standard deviation (the official `CodingRate` reports these).
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    if values.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Diagnostics of one encoder layer from its MSSA input `ln1`, its projection `qkv` and its
/// output `out` (all `[B, N, d]`).
pub fn layer(
    index: usize,
    ln1: &Tensor,
    qkv: &Tensor,
    out: &Tensor,
    heads: usize,
) -> Result<LayerDiagnostics> {
    Ok(LayerDiagnostics {
        layer: index,
        coding_rate: coding_rate(qkv, heads, CODING_RATE_EPS)?,
        expansion_rate: coding_rate(ln1, 1, CODING_RATE_EPS)?,
        sparsity: zero_fraction(out)?,
    })
}

/// Diagnostics of every traced encoder layer.
pub fn compute(
    blocks: &[EncoderBlockTrace],
    cfg: &CrateMaeConfig,
) -> Result<Vec<LayerDiagnostics>> {
    blocks
        .iter()
        .enumerate()
        .map(|(i, b)| layer(i, &b.ln1, &b.qkv, &b.out, cfg.heads))
        .collect()
}

/// `Σ_h ½ logdet(I_N + dh/(N ε²) X_h X_hᵀ)` per image for `[B, N, H·dh]` tokens, each token's
/// head slice normalised to unit length. With `heads = 1` this is the expansion term `R`.
pub fn coding_rate(tokens: &Tensor, heads: usize, eps: f64) -> Result<Vec<f64>> {
    let (b, n, d) = tokens.dims3()?;
    let dh = d / heads;
    let x = tokens
        .to_dtype(DType::F32)?
        .reshape((b, n, heads, dh))?
        .transpose(1, 2)?
        .contiguous()?; // [B, H, N, dh]
    let norms = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    let x = x.broadcast_div(&norms)?;
    // det(I_N + c·XXᵀ) = det(I_dh + c·XᵀX): factor whichever Gram matrix is smaller.
    let gram = if dh <= n {
        x.t()?.matmul(&x)?
    } else {
        x.matmul(&x.t()?)?
    };
    let k = dh.min(n);
    let gram: Vec<f32> = gram.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let scale = dh as f64 / (n as f64 * eps);
    // The factorisations are independent: spread them over the caller's compute threads.
    let halves = gram
        .par_chunks_exact(k * k)
        .map(|g| {
            let m = DMatrix::from_fn(k, k, |r, c| {
                f64::from(r == c) + scale * f64::from(g[r * k + c])
            });
            Ok(0.5 * logdet_spd(m)?)
        })
        .collect::<Result<Vec<f64>>>()?;
    Ok(halves.chunks_exact(heads).map(|h| h.iter().sum()).collect())
}

/// `log det` of a symmetric positive-definite matrix via Cholesky: `2 Σ log L_ii`.
pub fn logdet_spd(m: DMatrix<f64>) -> Result<f64> {
    let chol = m.cholesky().ok_or_else(|| {
        ModelError::input("coding-rate matrix is not positive definite (NaN or Inf tokens?)")
    })?;
    Ok(2.0
        * chol
            .l_dirty()
            .diagonal()
            .iter()
            .map(|v| v.ln())
            .sum::<f64>())
}

/// Fraction of exact zeros per image of a `[B, …]` tensor.
pub fn zero_fraction(x: &Tensor) -> Result<Vec<f64>> {
    let b = x.dim(0)?;
    let zeros = x
        .eq(0f64)?
        .to_dtype(DType::F32)?
        .reshape((b, ()))?
        .mean(1)?;
    Ok(zeros.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn logdet_matches_a_diagonal_matrix() {
        let m = DMatrix::from_diagonal(&nalgebra::DVector::from_vec(vec![2.0, 3.0, 4.0]));
        assert!((logdet_spd(m).unwrap() - 24f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn both_gram_forms_agree() {
        // N = 3 tokens, dh = 5 → the N×N form; N = 6, dh = 2 → the dh×dh form. Compare with a
        // direct N×N evaluation.
        for (n, d) in [(3usize, 5usize), (6, 2)] {
            let data: Vec<f32> = (0..n * d)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
                .collect();
            let t = Tensor::from_vec(data.clone(), (1, n, d), &Device::Cpu).unwrap();
            let got = coding_rate(&t, 1, 0.01).unwrap()[0];
            let rows: Vec<Vec<f64>> = data
                .chunks(d)
                .map(|r| {
                    let norm = r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt();
                    r.iter().map(|v| *v as f64 / norm).collect()
                })
                .collect();
            let scale = d as f64 / (n as f64 * 0.01);
            let m = DMatrix::from_fn(n, n, |i, j| {
                f64::from(i == j)
                    + scale
                        * rows[i]
                            .iter()
                            .zip(&rows[j])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
            });
            let want = 0.5 * logdet_spd(m).unwrap();
            assert!((got - want).abs() < 1e-4 * want.abs(), "{got} vs {want}");
        }
    }

    #[test]
    fn zero_fraction_counts_exact_zeros_per_image() {
        let t = Tensor::new(
            &[[0f32, 1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 1e-9]],
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(zero_fraction(&t).unwrap(), vec![0.5, 0.75]);
    }
}
