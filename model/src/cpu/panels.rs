//! `y = x·P` for a few rows `x` and one large, fixed `P`: the whitened grid's projection
//! (the built-in model's is 4,096 × 2,048, 32 MiB).
//!
//! A general GEMM packs `P` on every call; at these shapes that copy is most of the work
//! (`gemm`, 8 × 4,096 × 2,048 on one Xeon core: 3.7 ms where reading `P` once takes 1.3 ms;
//! 13 ms at 32 rows). Here `P` is packed once, at load, into panels of [`PANEL`] columns,
//! each `[k, PANEL]` contiguous, so a product streams `P` once, in order, and every panel's
//! accumulators for a block of rows stay in registers. The loops are plain Rust that the
//! compiler vectorises, compiled for AVX-512, AVX2 + FMA and the baseline; the variant is
//! chosen at run time.

use rayon::prelude::*;

/// Columns per panel: two AVX-512 registers, four AVX2 ones.
pub const PANEL: usize = 32;

/// Rows per register block (4 rows × 32 columns: 8 AVX-512 accumulators). Check the
/// generated code before changing it: at 8 rows the compiler no longer keeps the block in
/// registers, and the product was 15× slower.
const ROWS: usize = 4;

/// Steps of `k` per pass over the row blocks: 256 × 32 floats (32 KiB) of a panel stay in L1
/// while every row block uses them, so `P` is read from memory once whatever the batch (a
/// whole panel per row block re-read 32 MiB per 4 rows at a batch of 32).
const K_STEP: usize = 256;

/// A `[k, n]` matrix packed into column panels for [`PanelMatrix::left_multiply`].
#[derive(Debug, Clone)]
pub struct PanelMatrix {
    k: usize,
    n: usize,
    /// `n.div_ceil(PANEL)` panels, each `[k, PANEL]` row-major (the last zero-padded).
    data: Vec<f32>,
}

/// Where row `r` of a row-major `[rows, n]` matrix lies in its panel-major form (`PANEL`
/// columns per panel, each `[rows, PANEL]`): `(panel-major offset, row-major offset, width)`
/// for every panel and row. Packing, unpacking and gathering the product's rows all use it.
fn panel_spans(rows: usize, n: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    (0..n.div_ceil(PANEL)).flat_map(move |j| {
        let (from, width) = (j * PANEL, PANEL.min(n - j * PANEL));
        (0..rows).map(move |r| ((j * rows + r) * PANEL, r * n + from, width))
    })
}

impl PanelMatrix {
    /// Packs a row-major `[k, n]` matrix.
    pub fn pack(p: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(p.len(), k * n, "a [{k}, {n}] matrix");
        let mut data = vec![0f32; n.div_ceil(PANEL) * k * PANEL];
        for (packed, plain, width) in panel_spans(k, n) {
            data[packed..packed + width].copy_from_slice(&p[plain..plain + width]);
        }
        Self { k, n, data }
    }

    /// The row-major `[k, n]` matrix back.
    pub fn unpack(&self) -> Vec<f32> {
        let mut p = vec![0f32; self.k * self.n];
        for (packed, plain, width) in panel_spans(self.k, self.n) {
            p[plain..plain + width].copy_from_slice(&self.data[packed..packed + width]);
        }
        p
    }

    pub fn rows(&self) -> usize {
        self.k
    }

    pub fn cols(&self) -> usize {
        self.n
    }

    /// `x·P` for `x` row-major `[m, k]`: row-major `[m, n]`. Panels are shared among the
    /// rayon pool's threads.
    pub fn left_multiply(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.left_multiply_with(x, m, panel_product)
    }

    /// [`Self::left_multiply`] on a given panel kernel (the tests run every variant).
    fn left_multiply_with(&self, x: &[f32], m: usize, kernel: PanelKernel) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        assert_eq!(x.len(), m * k, "x must be [{m}, {k}]");
        if m == 0 || n == 0 || k == 0 {
            return vec![0f32; m * n];
        }
        // Whole blocks of ROWS rows transposed, `[k, ROWS]` per block, so that a step of the
        // inner loop reads its rows' values from one place; the last `m % ROWS` rows as they
        // are (a lone row would otherwise pay for ROWS).
        let blocks = m / ROWS;
        let mut xt = vec![0f32; blocks * k * ROWS];
        for (b, block) in xt.chunks_exact_mut(k * ROWS).enumerate() {
            for r in 0..ROWS {
                let row = &x[(b * ROWS + r) * k..(b * ROWS + r + 1) * k];
                for (kk, &v) in row.iter().enumerate() {
                    block[kk * ROWS + r] = v;
                }
            }
        }
        let rows = Rows {
            blocks: &xt,
            rest: &x[blocks * ROWS * k..],
            k,
        };
        // The product panel-major (`[m, PANEL]` per panel), then gathered into rows.
        let mut by_panel = vec![0f32; self.data.len() / k * m];
        by_panel
            .par_chunks_mut(m * PANEL)
            .zip(self.data.par_chunks_exact(k * PANEL))
            .for_each(|(out, panel)| kernel(&rows, panel, out));
        let mut y = vec![0f32; m * n];
        for (packed, plain, width) in panel_spans(m, n) {
            y[plain..plain + width].copy_from_slice(&by_panel[packed..packed + width]);
        }
        y
    }
}

/// The left operand as the kernels read it.
struct Rows<'a> {
    /// Whole blocks of [`ROWS`] rows, each `[k, ROWS]`.
    blocks: &'a [f32],
    /// The remaining rows, row-major `[_, k]`.
    rest: &'a [f32],
    k: usize,
}

/// One panel against every row: `out` is `[m, PANEL]`.
type PanelKernel = fn(&Rows, &[f32], &mut [f32]);

fn panel_product(rows: &Rows, panel: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked at run time).
            return unsafe { panel_product_avx512(rows, panel, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time).
            return unsafe { panel_product_avx2(rows, panel, out) };
        }
    }
    // aarch64 always has FMA (and 32 vector registers); the x86-64 baseline has neither.
    #[cfg(target_arch = "aarch64")]
    return panel_product_with::<true, 16, 16, 4>(rows, panel, out);
    #[allow(unreachable_code)]
    panel_product_with::<false, 8, 8, 4>(rows, panel, out)
}

/// 32 columns at a time: 8 of AVX-512's 32 registers accumulate.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn panel_product_avx512(rows: &Rows, panel: &[f32], out: &mut [f32]) {
    panel_product_with::<true, 32, 32, 4>(rows, panel, out)
}

/// Row blocks 16 columns at a time (32 would need all 16 AVX2 registers for the accumulators
/// alone: the compiler spilled them to the stack); a lone row all 32 columns over 2
/// interleaved steps (over 4 it spilled, and 16 columns read each step twice: one row on one
/// thread was 30 % slower than `gemm`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn panel_product_avx2(rows: &Rows, panel: &[f32], out: &mut [f32]) {
    panel_product_with::<true, 16, 32, 2>(rows, panel, out)
}

/// How far ahead a lone row's loop asks for its panel (4 KiB): with the hint, one row on one
/// thread streams `P` as fast as `gemm`'s matrix-vector product (without it, 10 % slower);
/// the row blocks reuse each step from L1 and were no faster with it.
const PREFETCH_AHEAD: usize = 8 * ROWS * PANEL;

#[inline(always)]
fn prefetch(p: *const f32) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint; it never faults, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(p as *const i8, std::arch::x86_64::_MM_HINT_T0)
    };
}

/// `c ← a·w + c`: an FMA instruction where `FUSED` (only where the CPU has one: elsewhere
/// `mul_add` is a library call).
#[inline(always)]
fn madd<const FUSED: bool>(a: f32, w: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(w, c)
    } else {
        c + a * w
    }
}

/// `W` columns of the panel per register block (what the vector registers hold for `ROWS`
/// accumulators). The row blocks share each step's panel values; a remaining row instead
/// gets `U` accumulators of its own, `RW` columns wide, over `U` interleaved steps, so that
/// it too keeps several independent chains of multiply-adds in flight.
#[inline(always)]
fn panel_product_with<const FUSED: bool, const W: usize, const RW: usize, const U: usize>(
    rows: &Rows,
    panel: &[f32],
    out: &mut [f32],
) {
    let k = rows.k;
    let (block_out, rest_out) = out.split_at_mut(rows.blocks.len() / k * PANEL);
    block_out.fill(0.0);
    rest_out.fill(0.0);
    for from in (0..k).step_by(K_STEP) {
        let steps = K_STEP.min(k - from);
        let panel = &panel[from * PANEL..(from + steps) * PANEL];
        for (block, out) in rows
            .blocks
            .chunks_exact(k * ROWS)
            .zip(block_out.chunks_exact_mut(ROWS * PANEL))
        {
            let x = &block[from * ROWS..(from + steps) * ROWS];
            for col in (0..PANEL).step_by(W) {
                let mut acc = [[0f32; W]; ROWS];
                for (acc, src) in acc.iter_mut().zip(out.chunks_exact(PANEL)) {
                    acc.copy_from_slice(&src[col..col + W]);
                }
                for (x, p) in x.chunks_exact(ROWS).zip(panel.chunks_exact(PANEL)) {
                    let p = &p[col..col + W];
                    for (acc, &a) in acc.iter_mut().zip(x) {
                        for (c, &w) in acc.iter_mut().zip(p) {
                            *c = madd::<FUSED>(a, w, *c);
                        }
                    }
                }
                for (dst, acc) in out.chunks_exact_mut(PANEL).zip(&acc) {
                    dst[col..col + W].copy_from_slice(acc);
                }
            }
        }
        for (row, out) in rows
            .rest
            .chunks_exact(k)
            .zip(rest_out.chunks_exact_mut(PANEL))
        {
            let x = &row[from..from + steps];
            for col in (0..PANEL).step_by(RW) {
                let mut acc = [[0f32; RW]; U];
                let (x_steps, p_steps) = (x.chunks_exact(U), panel.chunks_exact(U * PANEL));
                let (x_tail, p_tail) = (x_steps.remainder(), p_steps.remainder());
                for (x, p) in x_steps.zip(p_steps) {
                    prefetch(p.as_ptr().wrapping_add(PREFETCH_AHEAD));
                    for ((acc, &a), p) in acc.iter_mut().zip(x).zip(p.chunks_exact(PANEL)) {
                        for (c, &w) in acc.iter_mut().zip(&p[col..col + RW]) {
                            *c = madd::<FUSED>(a, w, *c);
                        }
                    }
                }
                for (&a, p) in x_tail.iter().zip(p_tail.chunks_exact(PANEL)) {
                    for (c, &w) in acc[0].iter_mut().zip(&p[col..col + RW]) {
                        *c = madd::<FUSED>(a, w, *c);
                    }
                }
                for (j, dst) in out[col..col + RW].iter_mut().enumerate() {
                    *dst += acc.iter().map(|a| a[j]).sum::<f32>();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plain(x: &[f32], p: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut y = vec![0f64; m * n];
        for r in 0..m {
            for kk in 0..k {
                for j in 0..n {
                    y[r * n + j] += x[r * k + kk] as f64 * p[kk * n + j] as f64;
                }
            }
        }
        y.into_iter().map(|v| v as f32).collect()
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                ((i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0
                    - 1.0
            })
            .collect()
    }

    /// Partial panels (n not a multiple of 32), partial row blocks (m not a multiple of 4),
    /// one row, against a plain f64 product.
    #[test]
    fn left_multiply_equals_a_plain_product() {
        // k over K_STEP: several passes, the last partial.
        // Empty shapes give empty or zero products.
        assert!(PanelMatrix::pack(&[1.0; 6], 2, 3)
            .left_multiply(&[], 0)
            .is_empty());
        assert_eq!(PanelMatrix::pack(&[], 0, 3).left_multiply(&[], 2), [0.0; 6]);
        for (m, k, n) in [
            (1, 7, 5),
            (3, 64, 32),
            (4, 33, 70),
            (9, 600, 96),
            (13, 256, 129),
        ] {
            let (x, p) = (values(m * k, 1), values(k * n, 2));
            let packed = PanelMatrix::pack(&p, k, n);
            assert_eq!(packed.unpack(), p, "unpack ∘ pack");
            let want = plain(&x, &p, m, k, n);
            // The one this CPU runs, and the portable forms of the others (same loops, the
            // widths of AVX2 and the baseline), whatever this CPU has.
            let kernels: [(&str, PanelKernel); 5] = [
                ("dispatched", panel_product),
                ("AVX-512's", panel_product_with::<true, 32, 32, 4>),
                ("AVX2's", panel_product_with::<true, 16, 32, 2>),
                ("aarch64's", panel_product_with::<true, 16, 16, 4>),
                ("the baseline's", panel_product_with::<false, 8, 8, 4>),
            ];
            for (name, kernel) in kernels {
                let got = packed.left_multiply_with(&x, m, kernel);
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs())
                    .fold(0f32, f32::max);
                assert!(
                    worst < 1e-4 * k as f32,
                    "{name} [{m}, {k}]·[{k}, {n}]: {worst}"
                );
            }
        }
    }
}
