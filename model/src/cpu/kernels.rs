//! Row kernels of the CPU encoder: LayerNorm, softmax, bias and residual, shrink-ReLU.
//!
//! Plain loops that the compiler vectorises; each is compiled twice, for AVX2 + FMA and for the
//! baseline, and the variant is chosen at run time (the release build targets any x86-64).
//! `exp` is a polynomial, so softmax vectorises too (a libm call per score would not).

/// `exp(x)` to about 2 ulp for the inputs softmax sees (`x ≤ 0`): Cody–Waite range reduction
/// `x = n·ln 2 + r`, a degree-6 polynomial for `e^r` (Cephes' `expf` coefficients) and `2^n`
/// built in the exponent bits.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Whether this CPU has AVX2 and FMA (the detection is cached by std).
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Compiles `$body` for AVX2 + FMA and for the baseline and calls the right one.
macro_rules! multiversion {
    ($(#[$meta:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        pub fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn imp($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    imp($($arg),*)
                }
                if has_avx2_fma() {
                    // SAFETY: the CPU has AVX2 and FMA (checked at run time).
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

/// `Σ f(x)` with eight partial sums, which the compiler keeps in one vector register
/// (a single running float sum would have to stay in order, and scalar).
#[inline(always)]
fn sum_by(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `max x` with eight partial maxima (inputs are finite).
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().fold(tail, |m, &v| if v > m { v } else { m })
}

multiversion! {
    /// Row-wise LayerNorm of `[rows, d]` (two-pass mean and variance, in f32).
    fn layer_norm(x: &[f32], d: usize, weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
        for (row, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
            let mean = sum_by(row, |v| v) / d as f32;
            let var = sum_by(row, |v| (v - mean) * (v - mean)) / d as f32;
            let inv = 1.0 / (var + eps).sqrt();
            for (((o, &v), &w), &b) in out.iter_mut().zip(row).zip(weight).zip(bias) {
                *o = (v - mean) * inv * w + b;
            }
        }
    }
}

multiversion! {
    /// In place, row by row: `softmax(scale · x)` over the last dimension of `[rows, n]`.
    fn softmax(x: &mut [f32], n: usize, scale: f32) {
        for row in x.chunks_exact_mut(n) {
            let m = max(row);
            for v in row.iter_mut() {
                *v = exp((*v - m) * scale);
            }
            let inv = 1.0 / sum_by(row, |v| v);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

multiversion! {
    /// `x[r] += y[r] + bias` for every row (the residual after a projection with bias).
    fn add_rows(x: &mut [f32], y: &[f32], bias: &[f32]) {
        let d = bias.len();
        for (xr, yr) in x.chunks_exact_mut(d).zip(y.chunks_exact(d)) {
            for ((a, &b), &c) in xr.iter_mut().zip(yr).zip(bias) {
                *a += b + c;
            }
        }
    }
}

multiversion! {
    /// `x[r] += bias` for every row.
    fn add_bias(x: &mut [f32], bias: &[f32]) {
        for row in x.chunks_exact_mut(bias.len()) {
            for (a, &b) in row.iter_mut().zip(bias) {
                *a += b;
            }
        }
    }
}

multiversion! {
    /// `x = max(x − t, 0)`: ISTA's shrinkage and ReLU.
    fn shrink_relu(x: &mut [f32], t: f32) {
        for v in x.iter_mut() {
            *v = (*v - t).max(0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polynomial_exp_is_within_a_few_ulp_of_libm() {
        let mut worst: f32 = 0.0;
        for i in 0..=87_000 {
            let x = -(i as f32) / 1000.0;
            let (ours, want) = (exp(x), x.exp());
            worst = worst.max(((ours - want) / want).abs());
        }
        assert!(worst < 5e-7, "relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn softmax_rows_sum_to_one_and_match_the_definition() {
        let mut x = vec![1.0, 2.0, 3.0, -1.0, 0.0, 1000.0];
        softmax(&mut x, 3, 0.5);
        let e = |v: f32| v.exp();
        let want0 = e(0.5) / (e(0.5) + e(1.0) + e(1.5));
        assert!((x[0] - want0).abs() < 1e-6);
        assert!((x[..3].iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!((x[5] - 1.0).abs() < 1e-6 && x[3] < 1e-6, "{x:?}");
    }

    #[test]
    fn layer_norm_normalises_each_row() {
        let x = vec![1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 14.0];
        let mut out = vec![0.0; 8];
        layer_norm(&x, 4, &[1.0; 4], &[0.5; 4], 0.0, &mut out);
        for row in out.chunks(4) {
            let mean = row.iter().sum::<f32>() / 4.0;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
            assert!(
                (mean - 0.5).abs() < 1e-6 && (var - 1.0).abs() < 1e-5,
                "{row:?}"
            );
        }
    }
}
