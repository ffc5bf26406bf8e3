//! The whole CRATE-MAE: patch embedding → (masking) → CRATE encoder → `norm` → CRATE decoder →
//! `decoder_norm` → `decoder_pred`.
//!
//! Unlike ViT-MAE the encoder sees all `1 + L` tokens: masked patches are replaced by the mask
//! token, and `decoder_pos_embed` is the position table added (the checkpoint's `pos_embed`
//! and `decoder_embed.*` are unused by the official forward pass).

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;

use crate::config::CrateMaeConfig;
use crate::decoder::DecoderBlock;
use crate::encoder::EncoderBlock;
use crate::error::{ModelError, Result};
use crate::masking::Mask;
use crate::ops::{LayerNorm, Linear};
use crate::patch_embed::{patchify, unpatchify, PatchEmbed};
use crate::taps::Taps;

/// How a `[B, N, d]` token sequence becomes one vector per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    /// The cls token (what the authors linear-probe).
    #[default]
    Cls,
    /// Mean of the patch tokens.
    Mean,
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
}

impl CrateMae {
    pub fn new(cfg: &CrateMaeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let (d, n) = (cfg.dim, cfg.seq_len());
        let blocks = (0..cfg.depth)
            .map(|i| EncoderBlock::new(cfg, i, vb.pp("blocks").pp(i)))
            .collect::<candle_core::Result<_>>()?;
        let decoder_blocks = (0..cfg.decoder_depth)
            .map(|i| DecoderBlock::new(cfg, i, vb.pp("decoder_blocks").pp(i)))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
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
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &CrateMaeConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn encoder_blocks(&self) -> &[EncoderBlock] {
        &self.blocks
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

    /// Tokens entering block 0: `[cls; patches or mask token] + decoder_pos_embed`.
    fn encoder_input(
        &self,
        images: &Tensor,
        mask: Option<&Mask>,
        taps: &mut Taps,
    ) -> Result<Tensor> {
        let b = self.check_images(images)?;
        let d = self.cfg.dim;
        let patches = self.patch_embed.forward(images)?;
        taps.record("", "patch_embed", &patches);
        let tokens = match mask {
            None => patches,
            Some(mask) => {
                if mask.batch_size() != b || mask.num_patches() != self.cfg.num_patches() {
                    return Err(ModelError::input(format!(
                        "mask is for {} images × {} patches, the batch has {b} × {}",
                        mask.batch_size(),
                        mask.num_patches(),
                        self.cfg.num_patches()
                    )));
                }
                let m = mask.to_tensor(&self.device)?.unsqueeze(D::Minus1)?; // [B, L, 1]
                let keep = (1.0 - &m)?;
                patches
                    .broadcast_mul(&keep)?
                    .broadcast_add(&self.mask_token.broadcast_mul(&m)?)?
            }
        };
        let cls = self.cls_token.expand((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &tokens], 1)?.broadcast_add(&self.pos_embed)?;
        taps.record("", "enc_input", &x);
        Ok(x)
    }

    /// The encoder up to and including block `last` (no final norm).
    fn encoder_blocks_through(&self, x: Tensor, last: usize, taps: &mut Taps) -> Result<Tensor> {
        self.blocks[..=last]
            .iter()
            .try_fold(x, |x, block| Ok(block.forward(&x, taps)?))
    }

    /// Encoder: `[B, C, S, S]` → `latent` `[B, 1 + L, d]` (after `norm`). With `mask = None`
    /// this is the embedding path.
    pub fn encode(&self, images: &Tensor, mask: Option<&Mask>, taps: &mut Taps) -> Result<Tensor> {
        let x = self.encoder_input(images, mask, taps)?;
        let x = self.encoder_blocks_through(x, self.cfg.depth - 1, taps)?;
        let latent = self.norm.forward(&x)?;
        taps.record("", "latent", &latent);
        Ok(latent)
    }

    /// Decoder: `latent` → predicted patches `[B, L, p²·C]`.
    pub fn decode(&self, latent: &Tensor, taps: &mut Taps) -> Result<Tensor> {
        let x = self
            .decoder_blocks
            .iter()
            .try_fold(latent.clone(), |x, block| block.forward(&x, taps))?;
        let x = self.decoder_norm.forward(&x)?;
        taps.record("dec", "norm", &x);
        let pred = self.decoder_pred.forward(&x)?;
        taps.record("dec", "pred_with_cls", &pred);
        let pred = pred.narrow(1, 1, self.cfg.num_patches())?;
        taps.record("", "pred", &pred);
        Ok(pred)
    }

    /// Final tokens of the unmasked encoder, `[B, 1 + L, d]`.
    pub fn embed_tokens(&self, images: &Tensor) -> Result<Tensor> {
        self.encode(images, None, &mut Taps::none())
    }

    /// One vector per image.
    pub fn embed(&self, images: &Tensor, pooling: Pooling) -> Result<Tensor> {
        pool(&self.embed_tokens(images)?, pooling)
    }

    /// Output tokens of encoder block `layer` (0-based; before the final norm).
    pub fn layer_tokens(&self, images: &Tensor, layer: usize) -> Result<Tensor> {
        self.check_layer(layer)?;
        let x = self.encoder_input(images, None, &mut Taps::none())?;
        self.encoder_blocks_through(x, layer, &mut Taps::none())
    }

    /// Attention probabilities `[B, H, N, N]` of encoder block `layer`, as the official
    /// `get_selfattention_enc` (the authors' segmentation view).
    pub fn attention_maps(&self, images: &Tensor, layer: usize) -> Result<Tensor> {
        self.check_layer(layer)?;
        let name = format!("enc.{layer}.attn");
        let mut taps = Taps::only([name.clone()]);
        let x = self.encoder_input(images, None, &mut taps)?;
        self.encoder_blocks_through(x, layer, &mut taps)?;
        taps.take(&name)
            .ok_or_else(|| ModelError::input(format!("no attention recorded for layer {layer}")))
    }

    fn check_layer(&self, layer: usize) -> Result<()> {
        if layer < self.cfg.depth {
            Ok(())
        } else {
            Err(ModelError::input(format!(
                "layer {layer} does not exist: the encoder has layers 0..{}",
                self.cfg.depth
            )))
        }
    }

    /// Masked completion: hide the masked patches, encode, decode, and paste the prediction
    /// into the masked places.
    pub fn complete(&self, images: &Tensor, mask: &Mask, taps: &mut Taps) -> Result<Completion> {
        let latent = self.encode(images, Some(mask), taps)?;
        let pred = self.decode(&latent, taps)?;
        self.assemble(images, mask, pred)
    }

    fn assemble(&self, images: &Tensor, mask: &Mask, pred: Tensor) -> Result<Completion> {
        let c = &self.cfg;
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
        let composite = ((images * (1.0 - &pixel_mask)?)? + (&reconstruction * &pixel_mask)?)?;
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
        let latent = self.embed_tokens(&x)?;
        if with_decoder {
            self.decode(&latent, &mut Taps::none())?;
        }
        Ok(())
    }
}

/// `[B, N, d]` → `[B, d]`.
pub fn pool(tokens: &Tensor, pooling: Pooling) -> Result<Tensor> {
    let n = tokens.dim(1)?;
    Ok(match pooling {
        Pooling::Cls => tokens.narrow(1, 0, 1)?.squeeze(1)?,
        Pooling::Mean => tokens.narrow(1, 1, n - 1)?.mean(1)?,
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
