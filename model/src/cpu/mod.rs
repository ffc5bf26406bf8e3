//! The encoder's inference pass on the CPU, as one custom operation instead of ~15 candle
//! operations per layer.
//!
//! Per image, every layer runs in buffers reused across layers and batches: LayerNorm, the
//! projection `w = LN(x)·Uᵀ`, attention one head at a time (an `N × N` block that stays in
//! cache, never a `[B, H, N, N]` tensor), `to_out` accumulated onto the residual, LayerNorm,
//! `n·M` and shrink-ReLU. The weights are candle's own tensors used in place (f32), or packed
//! once into bf16 panels for the AVX512-BF16 kernel.
//!
//! Threading: with at least as many images as compute threads, each thread takes whole
//! images and runs them with no synchronisation at all; with fewer, one image at a time uses
//! every thread inside its matrix products and across attention heads.

pub mod decoder;
mod kernels;
pub mod matmul;
pub mod panels;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::device::Precision;
use crate::encoder::EncoderBlock;
use crate::error::{ModelError, Result};
use crate::masking::Mask;
use crate::ops::{LayerNorm, Linear};
use matmul::{PackedBf16, Strided};

/// Below this many FLOPs per image, a lone image runs on one thread.
const INTRA_OP_MIN_FLOPS: f64 = 5e8;

/// A weight as the products see it.
#[derive(Debug)]
enum Weight {
    /// candle's f32 tensor, used in place (the tensor keeps the memory alive).
    F32 {
        view: Strided,
        _owner: Tensor,
    },
    Bf16(PackedBf16),
}

#[derive(Debug)]
struct Dense {
    weight: Weight,
    bias: Option<Vec<f32>>,
    /// Inputs and outputs.
    k: usize,
    n: usize,
}

/// The strided view of an f32 CPU tensor of shape `[out, in]`.
fn strided(t: &Tensor) -> Result<Strided> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)) = &*storage else {
        return Err(ModelError::Config(
            "the CPU encoder needs f32 weights on the CPU".into(),
        ));
    };
    let [s_out, s_in] = layout.stride()[..] else {
        return Err(ModelError::Config("a weight must be 2-D".into()));
    };
    // SAFETY: the storage of an immutable tensor never moves; `_owner` keeps it alive.
    let ptr = unsafe { data.as_ptr().add(layout.start_offset()) };
    Ok(Strided { ptr, s_out, s_in })
}

fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

impl Dense {
    fn new(linear: &Linear, precision: Precision) -> Result<Self> {
        let w = linear.weight();
        let (n, k) = w.dims2()?;
        let view = strided(w)?;
        let weight = match precision {
            Precision::Bf16 => Weight::Bf16(PackedBf16::pack(view, n, k)),
            _ => Weight::F32 {
                view,
                _owner: w.clone(),
            },
        };
        Ok(Self {
            weight,
            bias: linear.bias().map(host).transpose()?,
            k,
            n,
        })
    }

    /// `c[m, n] (+)= a[m, k]·Wᵀ` (no bias). bf16 cannot accumulate: `accumulate` is for f32.
    fn apply(
        &self,
        m: usize,
        a: &[f32],
        c: &mut [f32],
        accumulate: bool,
        scratch: &mut Vec<u32>,
        threads: usize,
    ) {
        debug_assert!(a.len() >= m * self.k && c.len() >= m * self.n);
        // SAFETY: the slices cover `[m, k]` and `[m, n]`; bf16 weights exist only where the
        // CPU has AVX512-BF16 (checked when packing in `CpuEncoder::new`).
        unsafe {
            match &self.weight {
                Weight::F32 { view, .. } => matmul::f32_xwt_threads(
                    m,
                    self.n,
                    self.k,
                    a.as_ptr(),
                    self.k,
                    *view,
                    c.as_mut_ptr(),
                    self.n,
                    accumulate,
                    threads,
                ),
                Weight::Bf16(packed) => {
                    debug_assert!(!accumulate);
                    matmul::bf16_xwt(
                        m,
                        a.as_ptr(),
                        self.k,
                        packed,
                        c.as_mut_ptr(),
                        self.n,
                        scratch,
                        threads,
                    )
                }
            }
        }
    }

    fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::F32 { .. } => 0,
            Weight::Bf16(p) => p.bytes(),
        }
    }
}

#[derive(Debug)]
struct Norm {
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f32,
}

impl Norm {
    fn new(ln: &LayerNorm) -> Result<Self> {
        Ok(Self {
            weight: host(ln.weight())?,
            bias: host(ln.bias())?,
            eps: ln.eps(),
        })
    }

    fn apply(&self, x: &[f32], out: &mut [f32]) {
        kernels::layer_norm(
            x,
            self.weight.len(),
            &self.weight,
            &self.bias,
            self.eps,
            out,
        );
    }
}

#[derive(Debug)]
struct Block {
    ln1: Norm,
    qkv: Dense,
    to_out: Dense,
    /// Scale still to apply to the scores (1 when folded into `qkv`).
    score_scale: f32,
    ln2: Norm,
    ista: Dense,
    threshold: f32,
}

/// Sizes of one image's pass.
#[derive(Debug, Clone, Copy)]
struct Dims {
    /// Tokens (1 + patches), width, heads, head width.
    n: usize,
    d: usize,
    heads: usize,
    dh: usize,
    /// Channels, image side, patch side, patches per side.
    c: usize,
    s: usize,
    p: usize,
    g: usize,
}

/// One thread's working memory, reused for every image it runs.
#[derive(Debug, Default)]
struct Scratch {
    patches: Vec<f32>,
    y: Vec<f32>,
    w: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    scores: Vec<f32>,
    bf16: Vec<u32>,
}

impl Scratch {
    fn size(&mut self, dims: &Dims, threads: usize) {
        let Dims { n, d, c, p, .. } = *dims;
        let fit = |v: &mut Vec<f32>, len| {
            if v.len() < len {
                v.resize(len, 0.0)
            }
        };
        fit(&mut self.patches, (n - 1) * c * p * p);
        fit(&mut self.y, n * d);
        fit(&mut self.w, n * d);
        fit(&mut self.att, n * d);
        fit(&mut self.tmp, n * d);
        fit(&mut self.scores, threads.max(1) * n * n);
    }
}

/// The encoder of a [`crate::CrateMae`] for inference on the CPU.
#[derive(Debug)]
pub struct CpuEncoder {
    dims: Dims,
    patch: Dense,
    cls: Vec<f32>,
    mask_token: Vec<f32>,
    pos: Vec<f32>,
    blocks: Vec<Block>,
    norm: Norm,
    precision: Precision,
    /// The encoder's multiply-adds ×2 per image (what one image's pass costs).
    flops_per_image: f64,
    /// Working memory of finished passes, reused (fresh buffers would be page-faulted in
    /// again on every batch).
    scratch: std::sync::Mutex<Vec<Scratch>>,
}

impl CpuEncoder {
    fn take_scratch(&self, threads: usize) -> Scratch {
        let mut s = self
            .scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default();
        s.size(&self.dims, threads);
        s
    }

    fn give_scratch(&self, s: Scratch) {
        self.scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(s);
    }

    /// From the model's parts (f32, on the CPU). bf16 needs AVX512-BF16.
    pub(crate) fn new(
        cfg: &crate::CrateMaeConfig,
        patch: &Linear,
        (cls, mask_token, pos): (&Tensor, &Tensor, &Tensor),
        blocks: &[EncoderBlock],
        norm: &LayerNorm,
        precision: Precision,
    ) -> Result<Self> {
        if precision == Precision::Bf16 && !matmul::bf16_supported() {
            return Err(ModelError::Config(
                "bf16 on the CPU needs AVX512_BF16, which this CPU lacks: use --dtype f32".into(),
            ));
        }
        if precision == Precision::F16 {
            return Err(ModelError::Config(
                "f16 is for GPUs; on the CPU use f32 or bf16".into(),
            ));
        }
        let blocks = blocks
            .iter()
            .map(|b| {
                let (qkv, to_out, score_scale) = b.mssa().parts();
                let (ista, threshold) = b.ista().fused().ok_or_else(|| {
                    ModelError::Config("the CPU encoder is for inference weights".into())
                })?;
                let to_out = to_out.ok_or_else(|| {
                    ModelError::Config("the CPU encoder needs the output projection".into())
                })?;
                Ok(Block {
                    ln1: Norm::new(b.ln1())?,
                    qkv: Dense::new(qkv, precision)?,
                    to_out: Dense::new(to_out, precision)?,
                    score_scale: score_scale as f32,
                    ln2: Norm::new(b.ln2())?,
                    ista: Dense::new(ista, precision)?,
                    threshold: threshold as f32,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            dims: Dims {
                n: cfg.seq_len(),
                d: cfg.dim,
                heads: cfg.heads,
                dh: cfg.dim_head(),
                c: cfg.in_chans,
                s: cfg.img_size,
                p: cfg.patch_size,
                g: cfg.grid_size(),
            },
            patch: Dense::new(patch, precision)?,
            cls: host(cls)?,
            mask_token: host(mask_token)?,
            pos: host(pos)?,
            blocks,
            norm: Norm::new(norm)?,
            precision,
            flops_per_image: cfg.encoder_flops_per_image(),
            scratch: Default::default(),
        })
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Memory of its own (packed bf16 weights); f32 weights are shared with candle.
    pub fn own_bytes(&self) -> usize {
        self.patch.weight_bytes()
            + self
                .blocks
                .iter()
                .map(|b| b.qkv.weight_bytes() + b.to_out.weight_bytes() + b.ista.weight_bytes())
                .sum::<usize>()
    }

    /// `[B, C, S, S]` images through blocks `0..=last`: the outputs of the blocks in `keep`
    /// (`[B, N, d]` each, before the final norm, in `keep`'s order), and when `last` is the
    /// final block the final tokens (after the final norm). A readout of early blocks (the
    /// built-in model's default embedding reads blocks 0 and 1 of 4) pays for those only.
    pub fn encode(
        &self,
        images: &Tensor,
        mask: Option<&Mask>,
        keep: &[usize],
        last: usize,
    ) -> Result<(Option<Tensor>, Vec<Tensor>)> {
        if last >= self.blocks.len() || keep.iter().any(|&k| k > last) {
            return Err(ModelError::input(format!(
                "a pass through block {last} of {} cannot keep blocks {keep:?}",
                self.blocks.len()
            )));
        }
        let blocks = last + 1;
        let Dims { n, d, c, s, .. } = self.dims;
        let b = images.dim(0)?;
        // The images in place when they are a contiguous f32 CPU tensor (what the server
        // sends): no copy of the batch's pixels.
        let (storage, layout) = images.storage_and_layout();
        let copied;
        let pixels: &[f32] = match (&*storage, layout.contiguous_offsets()) {
            (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((from, to))) => {
                &data[from..to]
            }
            _ => {
                copied = host(images)?;
                &copied
            }
        };
        let plane = c * s * s;
        let masks: Vec<Option<&[bool]>> = (0..b)
            .map(|i| mask.map(|m| m.rows()[i].as_slice()))
            .collect();
        let mut latent = vec![0f32; b * n * d];
        let mut kept = vec![0f32; keep.len() * b * n * d];
        let threads = rayon::current_num_threads();
        let per_image = n * d;
        // Splitting one small image's products over threads costs more in hand-offs than it
        // gains (the built-in model: 0.55 ms alone, 0.74 ms on two threads).
        let small = self.flops_per_image < INTRA_OP_MIN_FLOPS;
        if b >= threads || threads == 1 || small {
            // Whole images per thread: no synchronisation inside a pass.
            // One contiguous share of the images per thread (they all cost the same), each
            // with one scratch for all its images.
            let (kept_ptr, latent_ptr) =
                (SendSlice(kept.as_mut_ptr()), SendSlice(latent.as_mut_ptr()));
            let shares = threads.min(b);
            (0..shares).into_par_iter().for_each(|t| {
                let (kept, latent) = (kept_ptr, latent_ptr);
                let mut scratch = self.take_scratch(1);
                for i in (t * b / shares)..((t + 1) * b / shares) {
                    // SAFETY: image i writes only its own rows of the latent and of each
                    // kept layer.
                    let out = unsafe {
                        std::slice::from_raw_parts_mut(latent.0.add(i * per_image), per_image)
                    };
                    self.image(
                        &pixels[i * plane..(i + 1) * plane],
                        masks[i],
                        out,
                        &mut scratch,
                        1,
                        blocks,
                        |l, x| {
                            // SAFETY: as above.
                            let dst = unsafe {
                                std::slice::from_raw_parts_mut(
                                    kept.0.add((l * b + i) * per_image),
                                    per_image,
                                )
                            };
                            dst.copy_from_slice(x);
                        },
                        keep,
                    );
                }
                self.give_scratch(scratch);
            });
        } else {
            let mut scratch = self.take_scratch(threads);
            for i in 0..b {
                self.image(
                    &pixels[i * plane..(i + 1) * plane],
                    masks[i],
                    &mut latent[i * per_image..(i + 1) * per_image],
                    &mut scratch,
                    threads,
                    blocks,
                    |l, x| {
                        kept[(l * b + i) * per_image..(l * b + i + 1) * per_image]
                            .copy_from_slice(x)
                    },
                    keep,
                );
            }
            self.give_scratch(scratch);
        }
        let dev = &Device::Cpu;
        let latent = (blocks == self.blocks.len())
            .then(|| Tensor::from_vec(latent, (b, n, d), dev))
            .transpose()?;
        // One tensor for every kept block, each block a view of it: no copy per block.
        let kept = Tensor::from_vec(kept, (keep.len(), b, n, d), dev)?;
        let kept = (0..keep.len())
            .map(|l| kept.get(l))
            .collect::<candle_core::Result<_>>()?;
        Ok((latent, kept))
    }

    /// One image: embed, the first `blocks` blocks, and (after all of them) the final norm,
    /// into `out` (`[N, d]`).
    #[allow(clippy::too_many_arguments)]
    fn image(
        &self,
        pixels: &[f32],
        mask: Option<&[bool]>,
        out: &mut [f32],
        sc: &mut Scratch,
        threads: usize,
        blocks: usize,
        mut on_block: impl FnMut(usize, &[f32]),
        keep: &[usize],
    ) {
        let Dims {
            n, d, c, s, p, g, ..
        } = self.dims;
        let l = n - 1;
        let k = c * p * p;
        // Patches in (c, ki, kj) order, as the official Conv2d flattens its kernel.
        for i in 0..g {
            for j in 0..g {
                let row = &mut sc.patches[(i * g + j) * k..(i * g + j + 1) * k];
                for ch in 0..c {
                    for ki in 0..p {
                        let src = ch * s * s + (i * p + ki) * s + j * p;
                        row[(ch * p + ki) * p..(ch * p + ki + 1) * p]
                            .copy_from_slice(&pixels[src..src + p]);
                    }
                }
            }
        }
        // x = [cls; patches·Wᵀ + b, or the mask token] + position table.
        let x = out;
        self.patch
            .apply(l, &sc.patches, &mut x[d..], false, &mut sc.bf16, threads);
        if let Some(bias) = &self.patch.bias {
            kernels::add_bias(&mut x[d..], bias);
        }
        x[..d].copy_from_slice(&self.cls);
        if let Some(mask) = mask {
            for (t, &hidden) in mask.iter().enumerate() {
                if hidden {
                    x[(1 + t) * d..(2 + t) * d].copy_from_slice(&self.mask_token);
                }
            }
        }
        for (v, pos) in x.iter_mut().zip(&self.pos) {
            *v += pos;
        }
        for (index, block) in self.blocks[..blocks].iter().enumerate() {
            self.block(block, x, sc, threads);
            if keep.contains(&index) {
                on_block(keep.iter().position(|&k| k == index).expect("kept"), x);
            }
        }
        if blocks == self.blocks.len() {
            self.norm.apply(x, &mut sc.y[..n * d]);
            x.copy_from_slice(&sc.y[..n * d]);
        }
    }

    /// `x ← ISTA(LN2(x + MSSA(LN1(x))))` in place.
    fn block(&self, b: &Block, x: &mut [f32], sc: &mut Scratch, threads: usize) {
        let Dims { n, d, .. } = self.dims;
        let nd = n * d;
        // Compression: w = LN1(x)·Uᵀ, attention per head, then x += to_out(·) + bias.
        b.ln1.apply(x, &mut sc.y[..nd]);
        b.qkv
            .apply(n, &sc.y, &mut sc.w[..nd], false, &mut sc.bf16, threads);
        self.attention(b.score_scale, sc, threads);
        let Scratch { att, tmp, bf16, .. } = sc;
        match &b.to_out.weight {
            Weight::F32 { .. } => {
                // Accumulate straight onto the residual.
                b.to_out.apply(n, att, x, true, bf16, threads);
                if let Some(bias) = &b.to_out.bias {
                    kernels::add_bias(x, bias);
                }
            }
            Weight::Bf16(_) => {
                b.to_out.apply(n, att, &mut tmp[..nd], false, bf16, threads);
                let zero;
                let bias = match &b.to_out.bias {
                    Some(bias) => bias.as_slice(),
                    None => {
                        zero = vec![0.0; d];
                        &zero
                    }
                };
                kernels::add_rows(x, &tmp[..nd], bias);
            }
        }
        // Sparsification: x = ReLU(LN2(x)·M − ηλ).
        b.ln2.apply(x, &mut sc.y[..nd]);
        b.ista.apply(n, &sc.y, x, false, &mut sc.bf16, threads);
        kernels::shrink_relu(x, b.threshold);
    }

    /// `att[:, h] = softmax(w_h w_hᵀ · scale) w_h` for every head, from `sc.w`.
    fn attention(&self, scale: f32, sc: &mut Scratch, threads: usize) {
        let Dims {
            n, d, heads, dh, ..
        } = self.dims;
        attention(
            (n, d, heads, dh),
            scale,
            &sc.w,
            &mut sc.att,
            &mut sc.scores,
            threads,
        );
    }
}

/// `att[:, h] = softmax(w_h w_hᵀ · scale) w_h` for every head of `w` (`[n, d]`, heads of width
/// `dh` side by side), one head at a time in an `n × n` block that stays in cache; `scores`
/// holds `threads` such blocks.
fn attention(
    (n, d, heads, dh): (usize, usize, usize, usize),
    scale: f32,
    w: &[f32],
    att: &mut [f32],
    scores: &mut [f32],
    threads: usize,
) {
    let w = SendSlice(w.as_ptr() as *mut f32);
    let att = SendSlice(att.as_mut_ptr());
    let head = |h: usize, scores: &mut [f32]| {
        let (w, att) = (w, att);
        // SAFETY: `w` is only read; head h writes only its own columns of `att`.
        unsafe {
            let wh = w.0.add(h * dh) as *const f32;
            matmul::f32_ab(n, n, dh, wh, d, 1, wh, 1, d, scores.as_mut_ptr(), n);
            kernels::softmax(scores, n, scale);
            matmul::f32_ab(
                n,
                dh,
                n,
                scores.as_ptr(),
                n,
                1,
                wh,
                d,
                1,
                att.0.add(h * dh),
                d,
            );
        }
    };
    if threads > 1 {
        scores[..threads * n * n]
            .par_chunks_mut(n * n)
            .enumerate()
            .for_each(|(t, scores)| {
                for h in (t..heads).step_by(threads) {
                    head(h, scores);
                }
            });
    } else {
        for h in 0..heads {
            head(h, &mut scores[..n * n]);
        }
    }
}

#[derive(Clone, Copy)]
struct SendSlice(*mut f32);
// SAFETY: used only where parallel tasks touch disjoint parts (documented at each use).
unsafe impl Send for SendSlice {}
unsafe impl Sync for SendSlice {}
