//! The whole CRATE-MAE: patch embedding → (masking) → CRATE encoder → `norm` → CRATE decoder →
//! `decoder_norm` → `decoder_pred`.
//!
//! Unlike ViT-MAE the encoder sees all `1 + L` tokens: masked patches are replaced by the mask
//! token, and `decoder_pos_embed` is the position table added (the checkpoint's `pos_embed`
//! and `decoder_embed.*` are unused by the official forward pass).

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use std::sync::Arc;

use crate::config::CrateMaeConfig;
use crate::cpu::decoder::CpuDecoder;
use crate::cpu::CpuEncoder;
use crate::decoder::{DecoderBlock, DecoderBlockTrace};
use crate::device::Precision;
use crate::diagnostics::{self, LayerDiagnostics};
use crate::encoder::{EncoderBlock, EncoderBlockTrace};
use crate::error::{ModelError, Result};
use crate::masking::Mask;
use crate::ops::{LayerNorm, Linear};
use crate::patch_embed::{patchify, unpatchify, PatchEmbed};
use crate::readout::{WhitenedGrid, WhitenedGridSpec};

/// How a `[B, N, d]` token sequence becomes one vector per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    /// The cls token (what the authors linear-probe).
    #[default]
    Cls,
    /// Mean of the patch tokens.
    Mean,
    /// The model's whitened grid readout ([`crate::readout::WhitenedGrid`]): one or a few
    /// consecutive blocks' patch tokens averaged over a grid of regions, centred and
    /// PCA-whitened by a projection fitted on the training images. Only for models whose
    /// weights carry one.
    WhitenedGrid,
}

impl Pooling {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cls => "cls",
            Self::Mean => "mean",
            Self::WhitenedGrid => "whitened-grid",
        }
    }
}

impl std::str::FromStr for Pooling {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cls" => Ok(Self::Cls),
            "mean" => Ok(Self::Mean),
            "whitened-grid" => Ok(Self::WhitenedGrid),
            other => Err(ModelError::input(format!(
                "unknown pooling `{other}` (expected cls, mean or whitened-grid)"
            ))),
        }
    }
}

/// Output of a masked completion.
#[derive(Debug, Clone)]
pub struct Completion {
    /// `[B, L, p²·C]` predicted patches, (ki, kj, c) order, normalised pixel space.
    pub pred: Tensor,
    /// `[B, C, S, S]` the prediction as an image.
    pub reconstruction: Tensor,
    /// `[B, C, S, S]` visible patches from the input, masked ones from the prediction.
    pub composite: Tensor,
    /// `[B, L]`, 1 = masked.
    pub mask: Tensor,
}

/// What an encoder pass keeps besides the final latent, chosen by layer index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keep {
    /// Output tokens of these blocks (before the final norm).
    pub outputs: BTreeSet<usize>,
    /// Attention probabilities `[B, H, N, N]` of these blocks.
    pub attention: BTreeSet<usize>,
    /// Rate-reduction diagnostics of every block.
    pub diagnostics: bool,
    /// Compute the diagnostics for the first images only (a monitoring sample needs a few
    /// images, not the whole batch: on a GPU the host-side factorisations would otherwise
    /// cost more than the batch). `None`: every image.
    pub diagnostics_images: Option<usize>,
}

impl Keep {
    fn traces(&self, layer: usize) -> bool {
        self.diagnostics || self.attention.contains(&layer)
    }

    fn last_layer(&self, depth: usize) -> usize {
        if self.diagnostics {
            return depth - 1;
        }
        let last = |s: &BTreeSet<usize>| s.last().copied().unwrap_or(0);
        last(&self.outputs).max(last(&self.attention))
    }
}

/// The result of an encoder pass: f32 tensors on the model's device.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `[B, 1 + L, d]` after the final norm (`None` when only earlier layers were asked for
    /// through [`CrateMae::encode_through`]).
    pub latent: Option<Tensor>,
    pub outputs: BTreeMap<usize, Tensor>,
    pub attention: BTreeMap<usize, Tensor>,
    pub diagnostics: Option<Vec<LayerDiagnostics>>,
}

/// Every intermediate of an encoder pass, in the model's dtype (parity tests, debugging).
#[derive(Debug, Clone)]
pub struct EncoderTrace {
    pub patch_embed: Tensor,
    pub enc_input: Tensor,
    pub blocks: Vec<EncoderBlockTrace>,
    pub latent: Tensor,
}

/// Every intermediate of a decoder pass, in the model's dtype.
#[derive(Debug, Clone)]
pub struct DecoderTrace {
    pub blocks: Vec<DecoderBlockTrace>,
    pub norm: Tensor,
    pub pred_with_cls: Tensor,
    pub pred: Tensor,
}

#[derive(Debug, Clone)]
pub struct CrateMae {
    cfg: CrateMaeConfig,
    patch_embed: PatchEmbed,
    cls_token: Tensor,
    mask_token: Tensor,
    /// `decoder_pos_embed`, `[1, N, d]`: the table the official forward pass adds.
    pos_embed: Tensor,
    blocks: Vec<EncoderBlock>,
    norm: LayerNorm,
    decoder_blocks: Vec<DecoderBlock>,
    decoder_norm: LayerNorm,
    decoder_pred: Linear,
    device: Device,
    /// The dtype candle computes in.
    dtype: DType,
    /// The precision the model serves in (on a CPU, the fast encoder's; candle stays f32).
    precision: Precision,
    /// The CPU engine for the encoder's inference pass (CPU, inference weights only).
    cpu: Option<Arc<CpuEncoder>>,
    /// The CPU engine's decoder pass (f32; CPU, inference weights only).
    cpu_decoder: Option<Arc<CpuDecoder>>,
    /// The retrieval readout the weights ship, if any.
    whitened_grid: Option<WhitenedGrid>,
}

impl CrateMae {
    /// Builds the model in f32 (derived inference matrices are computed in f32/f64 from the
    /// f32 weights); [`CrateMae::to_dtype`] converts it afterwards.
    pub fn new(cfg: &CrateMaeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (d, n) = (cfg.dim, cfg.seq_len());
        let blocks = (0..cfg.depth)
            .map(|i| EncoderBlock::new(cfg, vb.pp("blocks").pp(i)))
            .collect::<candle_core::Result<_>>()?;
        let decoder_blocks = (0..cfg.decoder_depth)
            .map(|i| DecoderBlock::new(cfg, vb.pp("decoder_blocks").pp(i)))
            .collect::<candle_core::Result<_>>()?;
        let mut model = Self {
            patch_embed: PatchEmbed::new(cfg.in_chans, cfg.patch_size, d, vb.pp("patch_embed"))?,
            cls_token: vb.get((1, 1, d), "cls_token")?,
            mask_token: vb.get((1, 1, d), "mask_token")?,
            pos_embed: vb.get((1, n, d), "decoder_pos_embed")?,
            blocks,
            norm: LayerNorm::new(d, cfg.final_ln_eps, vb.pp("norm"))?,
            decoder_blocks,
            decoder_norm: LayerNorm::new(d, cfg.final_ln_eps, vb.pp("decoder_norm"))?,
            decoder_pred: Linear::new(d, cfg.patch_dim(), vb.pp("decoder_pred"))?,
            device: vb.device().clone(),
            dtype: vb.dtype(),
            precision: Precision::F32,
            cpu: None,
            cpu_decoder: None,
            whitened_grid: None,
            cfg: cfg.clone(),
        };
        let inference = !model.cls_token.track_op();
        if model.device.is_cpu() && model.dtype == DType::F32 && inference {
            model.cpu = Some(Arc::new(model.cpu_encoder(Precision::F32)?));
            model.cpu_decoder = Some(Arc::new(CpuDecoder::new(
                cfg,
                &model.decoder_blocks,
                &model.decoder_norm,
                &model.decoder_pred,
            )?));
        }
        Ok(model)
    }

    fn cpu_encoder(&self, precision: Precision) -> Result<CpuEncoder> {
        CpuEncoder::new(
            &self.cfg,
            self.patch_embed.projection(),
            (&self.cls_token, &self.mask_token, &self.pos_embed),
            &self.blocks,
            &self.norm,
            precision,
        )
    }

    /// The same model serving in `precision`: on a GPU, every weight converted once; on a
    /// CPU, the fast encoder's products in bf16 (AVX512-BF16) while candle's reference path
    /// (traces, diagnostics, the decoder) stays f32. Inputs are converted on entry and every
    /// public output is f32.
    pub fn with_precision(&self, precision: Precision) -> Result<Self> {
        precision.check_device(&self.device)?;
        if self.device.is_cpu() && self.cpu.is_some() {
            if precision == self.precision {
                return Ok(self.clone());
            }
            return Ok(Self {
                cpu: Some(Arc::new(self.cpu_encoder(precision)?)),
                precision,
                ..self.clone()
            });
        }
        let mut model = self.to_dtype(precision.dtype())?;
        model.precision = precision;
        Ok(model)
    }

    /// The same model with candle computing in `dtype` (weights converted once; inputs are
    /// converted on entry and every public output is f32). No CPU fast path unless f32.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        if dtype == self.dtype {
            return Ok(self.clone());
        }
        let t = |x: &Tensor| x.to_dtype(dtype);
        Ok(Self {
            cfg: self.cfg.clone(),
            patch_embed: self.patch_embed.to_dtype(dtype)?,
            cls_token: t(&self.cls_token)?,
            mask_token: t(&self.mask_token)?,
            pos_embed: t(&self.pos_embed)?,
            blocks: self
                .blocks
                .iter()
                .map(|b| b.to_dtype(dtype))
                .collect::<candle_core::Result<_>>()?,
            norm: self.norm.to_dtype(dtype)?,
            decoder_blocks: self
                .decoder_blocks
                .iter()
                .map(|b| b.to_dtype(dtype))
                .collect::<candle_core::Result<_>>()?,
            decoder_norm: self.decoder_norm.to_dtype(dtype)?,
            decoder_pred: self.decoder_pred.to_dtype(dtype)?,
            device: self.device.clone(),
            dtype,
            precision: match dtype {
                DType::BF16 => Precision::Bf16,
                DType::F16 => Precision::F16,
                _ => Precision::F32,
            },
            cpu: None,
            cpu_decoder: None,
            whitened_grid: self.whitened_grid.clone(),
        })
    }

    pub fn config(&self) -> &CrateMaeConfig {
        &self.cfg
    }

    /// The same model carrying a whitened grid readout (checked against its shape).
    pub fn with_whitened_grid(
        mut self,
        spec: WhitenedGridSpec,
        mean: Tensor,
        projection: Tensor,
    ) -> Result<Self> {
        let readout = WhitenedGrid::new(spec, mean, projection, self.cfg.dim, self.cfg.depth)?;
        self.whitened_grid = Some(readout);
        Ok(self)
    }

    /// The whitened grid readout the weights ship, if any.
    pub fn whitened_grid(&self) -> Option<&WhitenedGrid> {
        self.whitened_grid.as_ref()
    }

    /// The whitened grid embedding `[B, k]` from blocks' output tokens (those of
    /// `whitened_grid().spec.layers()`, kept by [`Keep::outputs`]).
    pub fn whitened_embedding(&self, outputs: &BTreeMap<usize, Tensor>) -> Result<Tensor> {
        match &self.whitened_grid {
            Some(readout) => readout.apply(outputs),
            None => Err(ModelError::input(
                "this model's weights carry no whitened-grid readout: use cls or mean pooling",
            )),
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype candle computes in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The precision the model serves in.
    /// What computes the model here: the CPU engine's kernel for its products (`f32-avx512`,
    /// `f32-avx2`, `avx512-bf16`, ...), or candle on the device (`candle-cuda-bf16`, ...).
    pub fn kernel(&self) -> String {
        match &self.cpu {
            Some(_) => crate::cpu::matmul::kernel_name(self.precision == Precision::Bf16).into(),
            None => format!(
                "candle-{}-{}",
                crate::device::describe(&self.device),
                self.precision.name()
            ),
        }
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The CPU fast path, when the model has one.
    pub fn cpu_encoder_engine(&self) -> Option<&CpuEncoder> {
        self.cpu.as_deref()
    }

    pub fn encoder_blocks(&self) -> &[EncoderBlock] {
        &self.blocks
    }

    pub fn patch_embedding(&self) -> &PatchEmbed {
        &self.patch_embed
    }

    pub fn final_norm(&self) -> &LayerNorm {
        &self.norm
    }

    /// `cls_token`, `mask_token` and the position table `[1, N, d]`.
    pub fn tokens(&self) -> (&Tensor, &Tensor, &Tensor) {
        (&self.cls_token, &self.mask_token, &self.pos_embed)
    }

    /// The CPU engine, for inputs it can take (CPU tensors that track no gradient).
    fn fast_path(&self, images: &Tensor) -> Option<&CpuEncoder> {
        self.cpu
            .as_deref()
            .filter(|_| images.device().is_cpu() && !images.track_op())
    }

    /// The fused CPU pass (the latent and the outputs of `layers`), when it can serve this
    /// call: the one place that dispatches to it and checks what it is given.
    fn fast_encode(
        &self,
        images: &Tensor,
        mask: Option<&Mask>,
        layers: &[usize],
        last: usize,
    ) -> Option<Result<(Option<Tensor>, Vec<Tensor>)>> {
        let cpu = self.fast_path(images)?;
        let run = || -> Result<(Option<Tensor>, Vec<Tensor>)> {
            self.check_images(images)?;
            if let Some(mask) = mask {
                self.check_mask(mask, images.dim(0)?)?;
            }
            cpu.encode(&images.to_dtype(DType::F32)?, mask, layers, last)
        };
        Some(run())
    }

    fn check_images(&self, images: &Tensor) -> Result<usize> {
        let c = &self.cfg;
        let expected = [c.in_chans, c.img_size, c.img_size];
        match images.dims() {
            [b, rest @ ..] if rest == expected && *b > 0 => Ok(*b),
            dims => Err(ModelError::input(format!(
                "images must be [B, {}, {}, {}] with B ≥ 1, got {dims:?}",
                c.in_chans, c.img_size, c.img_size
            ))),
        }
    }

    fn check_mask(&self, mask: &Mask, b: usize) -> Result<()> {
        if mask.batch_size() != b || mask.num_patches() != self.cfg.num_patches() {
            return Err(ModelError::input(format!(
                "mask is for {} images × {} patches, the batch has {b} × {}",
                mask.batch_size(),
                mask.num_patches(),
                self.cfg.num_patches()
            )));
        }
        Ok(())
    }

    /// Patch embeddings and the tokens entering block 0:
    /// `[cls; patches or mask token] + decoder_pos_embed`.
    fn encoder_input(&self, images: &Tensor, mask: Option<&Mask>) -> Result<(Tensor, Tensor)> {
        let b = self.check_images(images)?;
        let d = self.cfg.dim;
        let patches = self.patch_embed.forward(&images.to_dtype(self.dtype)?)?;
        let tokens = match mask {
            None => patches.clone(),
            Some(mask) => {
                self.check_mask(mask, b)?;
                let m = mask
                    .to_tensor(&self.device)?
                    .to_dtype(self.dtype)?
                    .unsqueeze(D::Minus1)?; // [B, L, 1]
                let keep = (1.0 - &m)?;
                patches
                    .broadcast_mul(&keep)?
                    .broadcast_add(&self.mask_token.broadcast_mul(&m)?)?
            }
        };
        let cls = self.cls_token.expand((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&self.pos_embed)?;
        Ok((patches, x))
    }

    /// Encoder: `[B, C, S, S]` → `latent` `[B, 1 + L, d]` (after `norm`), in the model's
    /// dtype. With `mask = None` this is the embedding path.
    pub fn encode(&self, images: &Tensor, mask: Option<&Mask>) -> Result<Tensor> {
        if let Some(fast) = self.fast_encode(images, mask, &[], self.cfg.depth - 1) {
            return Ok(fast?.0.expect("a whole pass has its latent"));
        }
        let (_, x) = self.encoder_input(images, mask)?;
        let x = self
            .blocks
            .iter()
            .try_fold(x, |x, block| block.forward(&x))?;
        Ok(self.norm.forward(&x)?)
    }

    /// The encoder, keeping what `keep` asks for (and the latent).
    pub fn encode_keeping(
        &self,
        images: &Tensor,
        mask: Option<&Mask>,
        keep: &Keep,
    ) -> Result<Encoded> {
        self.run_encoder(images, mask, keep, self.cfg.depth - 1)
    }

    /// Only as far as the deepest layer `keep` asks for: no latent.
    pub fn encode_through(&self, images: &Tensor, keep: &Keep) -> Result<Encoded> {
        self.run_encoder(images, None, keep, keep.last_layer(self.cfg.depth))
    }

    fn run_encoder(
        &self,
        images: &Tensor,
        mask: Option<&Mask>,
        keep: &Keep,
        last: usize,
    ) -> Result<Encoded> {
        for &l in keep.outputs.iter().chain(&keep.attention) {
            self.check_layer(l)?;
        }
        // Layer outputs come from the fast path too; attention maps and diagnostics need
        // candle's traced blocks.
        if !keep.diagnostics && keep.attention.is_empty() {
            let layers: Vec<usize> = keep.outputs.iter().copied().collect();
            if let Some(fast) = self.fast_encode(images, mask, &layers, last) {
                let (latent, kept) = fast?;
                return Ok(Encoded {
                    latent,
                    outputs: layers.into_iter().zip(kept).collect(),
                    attention: BTreeMap::new(),
                    diagnostics: None,
                });
            }
        }
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let (_, mut x) = self.encoder_input(images, mask)?;
        let mut out = Encoded {
            latent: None,
            outputs: BTreeMap::new(),
            attention: BTreeMap::new(),
            diagnostics: keep.diagnostics.then(Vec::new),
        };
        for (i, block) in self.blocks[..=last].iter().enumerate() {
            x = if keep.traces(i) {
                let t = block.trace(&x)?;
                if let Some(d) = out.diagnostics.as_mut() {
                    let b = t.ln1.dim(0)?;
                    let n = keep.diagnostics_images.map_or(b, |n| n.clamp(1, b));
                    let first = |x: &Tensor| x.narrow(0, 0, n);
                    d.push(diagnostics::layer(
                        i,
                        &first(&t.ln1)?,
                        &first(&t.qkv)?,
                        &first(&t.out)?,
                        self.cfg.heads,
                    )?);
                }
                if keep.attention.contains(&i) {
                    out.attention.insert(i, f32(&t.attn)?);
                }
                t.out
            } else {
                block.forward(&x)?
            };
            if keep.outputs.contains(&i) {
                out.outputs.insert(i, f32(&x)?);
            }
        }
        if last + 1 == self.cfg.depth {
            out.latent = Some(f32(&self.norm.forward(&x)?)?);
        }
        Ok(out)
    }

    /// Every intermediate of the encoder.
    pub fn trace_encoder(&self, images: &Tensor, mask: Option<&Mask>) -> Result<EncoderTrace> {
        let (patch_embed, enc_input) = self.encoder_input(images, mask)?;
        let mut x = enc_input.clone();
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for block in &self.blocks {
            let t = block.trace(&x)?;
            x = t.out.clone();
            blocks.push(t);
        }
        Ok(EncoderTrace {
            patch_embed,
            enc_input,
            blocks,
            latent: self.norm.forward(&x)?,
        })
    }

    /// Decoder: `latent` (any float dtype) → predicted patches `[B, L, p²·C]` in f32.
    pub fn decode(&self, latent: &Tensor) -> Result<Tensor> {
        if let Some(fast) = self
            .cpu_decoder
            .as_deref()
            .filter(|_| latent.device().is_cpu() && !latent.track_op())
        {
            return fast.decode(&latent.to_dtype(DType::F32)?);
        }
        let x = self
            .decoder_blocks
            .iter()
            .try_fold(latent.to_dtype(self.dtype)?, |x, block| block.forward(&x))?;
        let pred = self.decoder_pred.forward(&self.decoder_norm.forward(&x)?)?;
        Ok(pred
            .narrow(1, 1, self.cfg.num_patches())?
            .to_dtype(DType::F32)?)
    }

    /// Every intermediate of the decoder.
    pub fn trace_decoder(&self, latent: &Tensor) -> Result<DecoderTrace> {
        let mut x = latent.to_dtype(self.dtype)?;
        let mut blocks = Vec::with_capacity(self.decoder_blocks.len());
        for block in &self.decoder_blocks {
            let t = block.trace(&x)?;
            x = t.out.clone();
            blocks.push(t);
        }
        let norm = self.decoder_norm.forward(&x)?;
        let pred_with_cls = self.decoder_pred.forward(&norm)?;
        let pred = pred_with_cls.narrow(1, 1, self.cfg.num_patches())?;
        Ok(DecoderTrace {
            blocks,
            norm,
            pred_with_cls,
            pred,
        })
    }

    /// Final tokens of the unmasked encoder, `[B, 1 + L, d]`, f32.
    pub fn embed_tokens(&self, images: &Tensor) -> Result<Tensor> {
        Ok(self.encode(images, None)?.to_dtype(DType::F32)?)
    }

    /// One vector per image, f32.
    pub fn embed(&self, images: &Tensor, pooling: Pooling) -> Result<Tensor> {
        pool(&self.embed_tokens(images)?, pooling)
    }

    /// Output tokens of encoder block `layer` (0-based; before the final norm), f32.
    pub fn layer_tokens(&self, images: &Tensor, layer: usize) -> Result<Tensor> {
        let keep = Keep {
            outputs: [layer].into(),
            ..Keep::default()
        };
        let mut out = self.encode_through(images, &keep)?;
        Ok(out.outputs.remove(&layer).expect("kept"))
    }

    /// Attention probabilities `[B, H, N, N]` of encoder block `layer`, as the official
    /// `get_selfattention_enc` (the authors' segmentation view), f32.
    pub fn attention_maps(&self, images: &Tensor, layer: usize) -> Result<Tensor> {
        let keep = Keep {
            attention: [layer].into(),
            ..Keep::default()
        };
        let mut out = self.encode_through(images, &keep)?;
        Ok(out.attention.remove(&layer).expect("kept"))
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer < self.cfg.depth {
            Ok(())
        } else {
            Err(ModelError::input(format!(
                "layer {layer} does not exist: the encoder's layers are 0 to {} inclusive",
                self.cfg.depth - 1
            )))
        }
    }

    /// Masked completion: hide the masked patches, encode, decode, and paste the prediction
    /// into the masked places.
    pub fn complete(&self, images: &Tensor, mask: &Mask) -> Result<Completion> {
        let latent = self.encode(images, Some(mask))?;
        self.assemble(images, mask, self.decode(&latent)?)
    }

    /// [`CrateMae::complete`], with the masked encoder pass keeping what `keep` asks for.
    pub fn complete_keeping(
        &self,
        images: &Tensor,
        mask: &Mask,
        keep: &Keep,
    ) -> Result<(Completion, Encoded)> {
        let encoded = self.encode_keeping(images, Some(mask), keep)?;
        let latent = encoded.latent.as_ref().expect("full encoder pass");
        let completion = self.assemble(images, mask, self.decode(latent)?)?;
        Ok((completion, encoded))
    }

    fn assemble(&self, images: &Tensor, mask: &Mask, pred: Tensor) -> Result<Completion> {
        let c = &self.cfg;
        let images = images.to_dtype(DType::F32)?;
        let reconstruction = unpatchify(&pred, c.patch_size, c.in_chans)?;
        let mask_t = mask.to_tensor(&self.device)?;
        let pixel_mask = unpatchify(
            &mask_t
                .unsqueeze(D::Minus1)?
                .broadcast_as(pred.shape())?
                .contiguous()?,
            c.patch_size,
            c.in_chans,
        )?;
        let composite = ((&images * (1.0 - &pixel_mask)?)? + (&reconstruction * &pixel_mask)?)?;
        Ok(Completion {
            pred,
            reconstruction,
            composite,
            mask: mask_t,
        })
    }

    /// `patchify` with this model's patch size.
    pub fn patchify(&self, images: &Tensor) -> Result<Tensor> {
        Ok(patchify(images, self.cfg.patch_size)?)
    }

    /// The training objective: mean over masked patches of the per-patch MSE against the
    /// (optionally per-patch normalised) pixels.
    pub fn loss(
        &self,
        images: &Tensor,
        pred: &Tensor,
        mask: &Tensor,
        norm_pix: bool,
    ) -> Result<Tensor> {
        let target = self.patchify(images)?;
        let target = if norm_pix {
            normalise_patches(&target)?
        } else {
            target
        };
        masked_mse(pred, &target, mask)
    }

    /// Denormalises `[B, C, S, S]` model-space pixels back to `[0, 1]` with the model's
    /// mean/std (not clamped).
    pub fn denormalise(&self, images: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        let shape = (1, c.in_chans.min(3), 1, 1);
        let mean = Tensor::from_slice(&c.mean[..shape.1], shape, &self.device)?;
        let std = Tensor::from_slice(&c.std[..shape.1], shape, &self.device)?;
        Ok(images.broadcast_mul(&std)?.broadcast_add(&mean)?)
    }

    /// Runs one batch of zeros so lazy allocations and kernel setup happen before serving.
    pub fn warm_up(&self, batch: usize, with_decoder: bool) -> Result<()> {
        let c = &self.cfg;
        let x = Tensor::zeros(
            (batch, c.in_chans, c.img_size, c.img_size),
            DType::F32,
            &self.device,
        )?;
        let latent = self.encode(&x, None)?;
        if with_decoder {
            self.decode(&latent)?;
        }
        // Block until the device has finished, so warm-up timings are real.
        self.device.synchronize()?;
        Ok(())
    }
}

/// Cls or mean pooling of `[B, N, d]` tokens; the whitened grid needs the model's own
/// projection ([`CrateMae::whitened_embedding`]).
pub fn pool(tokens: &Tensor, pooling: Pooling) -> Result<Tensor> {
    let n = tokens.dim(1)?;
    Ok(match pooling {
        Pooling::Cls => tokens.narrow(1, 0, 1)?.squeeze(1)?,
        Pooling::Mean => tokens.narrow(1, 1, n - 1)?.mean(1)?,
        Pooling::WhitenedGrid => {
            return Err(ModelError::input(
                "whitened-grid pooling needs the model's projection (CrateMae::whitened_embedding)",
            ))
        }
    })
}

/// `(x − mean) / sqrt(var_unbiased + 1e-6)` per patch (the `norm_pix_loss` target).
pub fn normalise_patches(target: &Tensor) -> Result<Tensor> {
    let k = target.dim(D::Minus1)?;
    let mean = target.mean_keepdim(D::Minus1)?;
    let centred = target.broadcast_sub(&mean)?;
    let var = (centred.sqr()?.sum_keepdim(D::Minus1)? / (k as f64 - 1.0))?;
    Ok(centred.broadcast_div(&(var + 1e-6)?.sqrt()?)?)
}

/// `Σ_l mask[b,l] · mean_k (pred − target)² / Σ mask`.
pub fn masked_mse(pred: &Tensor, target: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let per_patch = (pred - target)?.sqr()?.mean(D::Minus1)?;
    Ok((per_patch * mask)?
        .sum_all()?
        .broadcast_div(&mask.sum_all()?)?)
}
