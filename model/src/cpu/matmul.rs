//! Matrix products of the CPU encoder.
//!
//! f32: the `gemm` crate (AVX-512 / AVX2 kernels, chosen at run time) on strided views, so a
//! weight is used in place, as candle stores it (on the CPU, laid out transposed at load:
//! `checkpoint::model_from_tensors`). bf16: a kernel of our own on AVX512-BF16
//! (`vdpbf16ps`: two bf16 products accumulated into f32 per lane, twice the f32 rate): the
//! weights are converted and packed once at load, the activations are rounded to bf16 as they
//! enter each product, and every accumulation is f32.

use gemm::Parallelism;

/// A weight `W` (`[out, in]`, PyTorch's layout) applied as `y = x·Wᵀ`, seen through strides:
/// element `(o, i)` is at `ptr[o·s_out + i·s_in]`.
#[derive(Debug, Clone, Copy)]
pub struct Strided {
    pub ptr: *const f32,
    pub s_out: usize,
    pub s_in: usize,
}

// SAFETY: the pointer is into an immutable weight kept alive by its owner (see `Dense`).
unsafe impl Send for Strided {}
unsafe impl Sync for Strided {}

impl Strided {
    /// The same weight from output `start` on.
    ///
    /// # Safety
    /// `start` must be within the weight's outputs.
    unsafe fn skip_outputs(self, start: usize) -> Self {
        Self {
            ptr: self.ptr.add(start * self.s_out),
            ..self
        }
    }
}

/// `c[m, n] (+)= a[m, k] · Wᵀ`, `a` and `c` row-major with row strides `lda`, `ldc`.
///
/// # Safety
/// `a`, `c` and `w` must be valid for the shapes and strides given.
#[allow(clippy::too_many_arguments)]
pub unsafe fn f32_xwt(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    w: Strided,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    parallelism: Parallelism,
) {
    // gemm's argument order: (dst, dst_cs, dst_rs), (lhs, lhs_cs, lhs_rs), (rhs, rhs_cs,
    // rhs_rs); rhs(k_i, n_j) = W[n_j, k_i].
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        accumulate,
        a,
        1,
        lda as isize,
        w.ptr,
        w.s_out as isize,
        w.s_in as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    );
}

/// Products smaller than this (in FLOP) are not split by columns.
const SPLIT_MIN_FLOP: usize = 16_000_000;

/// [`f32_xwt`] on `threads` threads, each computing its own block of output columns with a
/// single-threaded product: each thread packs only its part of `Wᵀ` and nothing synchronises
/// inside the product. At batch 1 (197×768×768, two Xeon cores, a different weight each call)
/// this runs at 236 GFLOP/s where `gemm`'s own two-thread split gives 204; at M = 50, 185
/// against 136.
///
/// # Safety
/// As [`f32_xwt`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn f32_xwt_threads(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    w: Strided,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    threads: usize,
) {
    // Column blocks in whole 16-lane registers.
    let block = n.div_ceil(threads.max(1)).next_multiple_of(16);
    if threads <= 1 || block >= n || 2 * m * n * k < SPLIT_MIN_FLOP {
        // One thread, or a small product (the built-in model's: 65×128×128), where gemm's
        // own policy was measured faster than one task per block.
        let parallelism = match threads {
            0 | 1 => Parallelism::None,
            t => Parallelism::Rayon(t),
        };
        return f32_xwt(m, n, k, a, lda, w, c, ldc, accumulate, parallelism);
    }
    // Raw pointers are not Send; the blocks write disjoint columns of `c`.
    let (a, c) = (a as usize, c as usize);
    rayon::scope(|scope| {
        for start in (0..n).step_by(block) {
            scope.spawn(move |_| {
                let (a, c) = (a as *const f32, (c as *mut f32).add(start));
                let (cols, w) = (block.min(n - start), w.skip_outputs(start));
                f32_xwt(m, cols, k, a, lda, w, c, ldc, accumulate, Parallelism::None);
            });
        }
    });
}

/// `c[m, n] = a[m, k] · b[k, n]` for plain row-major blocks (attention).
///
/// # Safety
/// As [`f32_xwt`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn f32_ab(
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
    c: *mut f32,
    ldc: usize,
) {
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        false,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        1.0,
        1.0,
        false,
        false,
        false,
        Parallelism::None,
    );
}

/// Columns per packed panel: two 16-lane registers.
const NR: usize = 32;
/// Rows per kernel call.
const MR: usize = 8;

/// `W` rounded to bf16 and packed for the kernel: panels of 32 output columns; within a
/// panel, for each pair of input rows `(2j, 2j+1)`, 32 lanes holding both values (even index
/// in the low half, as `vdpbf16ps` pairs them).
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    pub k: usize,
    pub n: usize,
    k2: usize,
    data: Vec<u32>,
}

/// Round to nearest even (inputs are finite).
#[inline(always)]
pub fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

impl PackedBf16 {
    /// Packs `W` (`[n = out, k = in]`, seen through `w`).
    pub fn pack(w: Strided, n: usize, k: usize) -> Self {
        let k2 = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * k2 * NR];
        // SAFETY: `w` covers `[n, k]` (the caller's contract, as for `f32_xwt`).
        let at = |o: usize, i: usize| unsafe { *w.ptr.add(o * w.s_out + i * w.s_in) };
        for p in 0..panels {
            for j in 0..k2 {
                for c in 0..NR {
                    let o = p * NR + c;
                    if o >= n {
                        continue;
                    }
                    let lo = bf16_bits(at(o, 2 * j)) as u32;
                    let hi = if 2 * j + 1 < k {
                        bf16_bits(at(o, 2 * j + 1)) as u32
                    } else {
                        0
                    };
                    data[(p * k2 + j) * NR + c] = lo | (hi << 16);
                }
            }
        }
        Self { k, n, k2, data }
    }

    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// The kernel that computes the encoder's products in `bf16` (or f32) on this CPU, chosen at
/// run time from its features: named in the server's log, `GetModelInfo` and `/metrics`.
pub fn kernel_name(bf16: bool) -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if bf16 {
            return "avx512-bf16";
        }
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "f32-avx512";
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "f32-avx2";
        }
        "f32-generic"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = bf16;
        "f32-generic"
    }
}

/// Whether this CPU runs the bf16 kernel.
pub fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `c[m, n] = a[m, k] · Wᵀ` with `W` packed. `scratch` holds the activations as bf16 pairs.
/// Output columns are split over `threads` (1: run here).
///
/// # Safety
/// `a` and `c` must be valid for `[m, k]` / `[m, n]` with row strides `lda` / `ldc`, and the
/// CPU must have AVX512-BF16 ([`bf16_supported`]).
#[allow(clippy::too_many_arguments)]
pub unsafe fn bf16_xwt(
    m: usize,
    a: *const f32,
    lda: usize,
    w: &PackedBf16,
    c: *mut f32,
    ldc: usize,
    scratch: &mut Vec<u32>,
    threads: usize,
) {
    let k2 = w.k2;
    scratch.clear();
    scratch.resize(m * k2, 0);
    for r in 0..m {
        let row = std::slice::from_raw_parts(a.add(r * lda), w.k);
        let out = &mut scratch[r * k2..(r + 1) * k2];
        for (j, o) in out.iter_mut().enumerate() {
            let lo = bf16_bits(row[2 * j]) as u32;
            let hi = row.get(2 * j + 1).map_or(0, |&v| bf16_bits(v) as u32);
            *o = lo | (hi << 16);
        }
    }
    let panels = w.n.div_ceil(NR);
    let a2 = SendPtr(scratch.as_ptr() as *mut u32);
    let cp = SendPtr(c);
    let run = move |p: usize| {
        let (a2, cp) = (a2, cp);
        let cols = (w.n - p * NR).min(NR);
        let panel = w.data.as_ptr().add(p * k2 * NR);
        let mut r = 0;
        while r < m {
            let rows = (m - r).min(MR);
            #[cfg(target_arch = "x86_64")]
            kernel(
                rows,
                k2,
                a2.0.add(r * k2),
                k2,
                panel,
                cp.0.add(r * ldc + p * NR),
                ldc,
                cols,
            );
            r += rows;
        }
    };
    if threads <= 1 || panels < 2 {
        (0..panels).for_each(run);
    } else {
        use rayon::prelude::*;
        (0..panels).into_par_iter().for_each(run);
    }
}

#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
// SAFETY: every parallel task writes a disjoint column range and reads shared inputs.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn kernel(
    rows: usize,
    k2: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    match rows {
        8 => tile::<8>(k2, a, lda, b, c, ldc, cols),
        7 => tile::<7>(k2, a, lda, b, c, ldc, cols),
        6 => tile::<6>(k2, a, lda, b, c, ldc, cols),
        5 => tile::<5>(k2, a, lda, b, c, ldc, cols),
        4 => tile::<4>(k2, a, lda, b, c, ldc, cols),
        3 => tile::<3>(k2, a, lda, b, c, ldc, cols),
        2 => tile::<2>(k2, a, lda, b, c, ldc, cols),
        _ => tile::<1>(k2, a, lda, b, c, ldc, cols),
    }
}

/// An `R × 32` tile of `c`, accumulated over every input pair in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile<const R: usize>(
    k2: usize,
    a: *const u32,
    lda: usize,
    b: *const u32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    for j in 0..k2 {
        let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(j * NR) as *const _));
        let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(j * NR + 16) as *const _));
        for (r, acc) in acc.iter_mut().enumerate() {
            let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * lda + j) as i32));
            acc[0] = _mm512_dpbf16_ps(acc[0], x, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], x, b1);
        }
    }
    let (m0, m1): (u16, u16) = if cols >= NR {
        (0xffff, 0xffff)
    } else if cols > 16 {
        (0xffff, (1u32 << (cols - 16)).wrapping_sub(1) as u16)
    } else {
        ((1u32 << cols).wrapping_sub(1) as u16, 0)
    };
    for (r, acc) in acc.iter().enumerate() {
        let row = c.add(r * ldc);
        _mm512_mask_storeu_ps(row, m0, acc[0]);
        _mm512_mask_storeu_ps(row.add(16), m1, acc[1]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(a: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for o in 0..n {
                c[i * n + o] = (0..k).map(|j| a[i * k + j] * w[o * k + j]).sum();
            }
        }
        c
    }

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 2001) as f32 / 1000.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn f32_product_uses_the_weight_in_place() {
        let (m, n, k) = (5, 7, 9);
        let (a, w) = (data(m * k, 1), data(n * k, 2));
        let mut c = vec![0.0; m * n];
        let ws = Strided {
            ptr: w.as_ptr(),
            s_out: k,
            s_in: 1,
        };
        unsafe {
            f32_xwt(
                m,
                n,
                k,
                a.as_ptr(),
                k,
                ws,
                c.as_mut_ptr(),
                n,
                false,
                Parallelism::None,
            )
        };
        for (x, y) in c.iter().zip(reference(&a, &w, m, n, k)) {
            assert!((x - y).abs() < 1e-5);
        }
    }

    /// Column blocks per thread: partial last blocks, more threads than blocks, the weight
    /// in both layouts, accumulating into what `c` held.
    #[test]
    fn f32_product_split_by_columns_equals_the_reference() {
        // The last two are big enough to be split by columns; the others take gemm's policy.
        let cases = [
            (3, 40, 9, 3),
            (5, 7, 4, 2),
            (197, 200, 300, 2),
            (300, 130, 260, 3),
        ];
        for (m, n, k, threads) in cases {
            let (a, w) = (data(m * k, 5), data(n * k, 6));
            // `w` row-major [n, k], and the same weight laid out transposed.
            let wt: Vec<f32> = (0..k * n).map(|i| w[(i % n) * k + i / n]).collect();
            let views = [
                Strided {
                    ptr: w.as_ptr(),
                    s_out: k,
                    s_in: 1,
                },
                Strided {
                    ptr: wt.as_ptr(),
                    s_out: 1,
                    s_in: n,
                },
            ];
            let want = reference(&a, &w, m, n, k);
            for view in views {
                let mut c = vec![1.0; m * n];
                unsafe {
                    f32_xwt_threads(
                        m,
                        n,
                        k,
                        a.as_ptr(),
                        k,
                        view,
                        c.as_mut_ptr(),
                        n,
                        true,
                        threads,
                    )
                };
                for (i, (x, y)) in c.iter().zip(&want).enumerate() {
                    assert!(
                        (x - (y + 1.0)).abs() < 1e-4,
                        "{m}x{n}x{k} on {threads} threads, element {i}: {x} vs {}",
                        y + 1.0
                    );
                }
            }
        }
    }

    #[test]
    fn bf16_product_matches_within_bf16_rounding() {
        if !bf16_supported() {
            eprintln!("no AVX512-BF16 on this CPU: nothing to check");
            return;
        }
        // Odd sizes: partial panels, partial row tiles, an odd inner dimension.
        for (m, n, k) in [(1, 1, 1), (9, 33, 17), (20, 70, 64), (65, 128, 128)] {
            let (a, w) = (data(m * k, 3), data(n * k, 4));
            let packed = PackedBf16::pack(
                Strided {
                    ptr: w.as_ptr(),
                    s_out: k,
                    s_in: 1,
                },
                n,
                k,
            );
            let mut c = vec![f32::NAN; m * n];
            let mut scratch = vec![];
            for threads in [1, 2] {
                unsafe {
                    bf16_xwt(
                        m,
                        a.as_ptr(),
                        k,
                        &packed,
                        c.as_mut_ptr(),
                        n,
                        &mut scratch,
                        threads,
                    )
                };
                let want = reference(&a, &w, m, n, k);
                for (x, y) in c.iter().zip(&want) {
                    // Each product of two bf16-rounded values: relative error ≤ 2⁻⁸ each.
                    assert!(
                        (x - y).abs() <= 8e-3 * (k as f32).sqrt() + 1e-6,
                        "{m}×{n}×{k}: {x} vs {y}"
                    );
                }
            }
        }
    }
}
