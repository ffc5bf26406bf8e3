//! The real backend: CRATE-MAE in candle on the configured device and precision.
//!
//! Only what each image asked for comes to the host: pooled vectors are formed on the device
//! for the whole batch and copied once; patch tokens and attention rows only when requested.

use std::collections::BTreeMap;

use candle_core::{DType, Device, IndexOp, Tensor, D};
use crate_mae::{mae, CrateMae, Keep, Mask, Pooling};

use crate::engine::backend::{Backend, EmbedOutputs, PixelBatch};
use crate::engine::types::{
    AttentionMap, CompleteTask, CompletedPixels, EmbedTask, Embedding, ImageDiagnostics, ModelFacts,
};
use crate::error::ServeError;

/// Images of a sampled batch whose diagnostics feed the gauges.
const SAMPLED_IMAGES: usize = 4;

pub struct CandleBackend {
    model: CrateMae,
    facts: ModelFacts,
}

impl CandleBackend {
    pub fn new(model: CrateMae, facts: ModelFacts) -> Self {
        Self { model, facts }
    }

    fn input(&self, pixels: PixelBatch<'_>) -> Result<Tensor, ServeError> {
        let s = self.facts.config.img_size;
        Ok(Tensor::from_slice(
            pixels.data,
            (pixels.batch, 3, s, s),
            self.model.device(),
        )?)
    }
}

fn host(t: &Tensor) -> Result<Vec<f32>, ServeError> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// `[B, N, d]` tokens pooled, on the device, each way some task asked for; each copied to
/// the host once.
struct Pooled {
    /// Per pooling asked for: values per image, all images' values.
    by: Vec<(Pooling, usize, Vec<f32>)>,
}

impl Pooled {
    /// `tokens` is `source`'s output; the whitened grid reads the blocks it names from
    /// `outputs`.
    fn of(
        model: &CrateMae,
        tokens: &Tensor,
        outputs: &BTreeMap<usize, Tensor>,
        tasks: &[&EmbedTask],
        source: Option<usize>,
    ) -> Result<Self, ServeError> {
        let mut by = Vec::new();
        for p in [Pooling::Cls, Pooling::Mean, Pooling::WhitenedGrid] {
            if tasks
                .iter()
                .any(|t| t.pooled_from == source && t.pooling == p)
            {
                let pooled = match p {
                    Pooling::WhitenedGrid => model.whitened_embedding(outputs)?,
                    cls_or_mean => mae::pool(tokens, cls_or_mean)?,
                };
                by.push((p, pooled.dim(D::Minus1)?, host(&pooled)?));
            }
        }
        Ok(Self { by })
    }

    fn row(&self, pooling: Pooling, b: usize) -> Vec<f32> {
        let (_, dim, all) = self
            .by
            .iter()
            .find(|(p, ..)| *p == pooling)
            .expect("pooled for a task that asked");
        all[b * dim..(b + 1) * dim].to_vec()
    }
}

impl Backend for CandleBackend {
    fn facts(&self) -> &ModelFacts {
        &self.facts
    }

    fn embed(
        &self,
        pixels: PixelBatch<'_>,
        tasks: &[&EmbedTask],
        sample: bool,
    ) -> Result<EmbedOutputs, ServeError> {
        let input = self.input(pixels)?;
        let requested = tasks.iter().any(|t| t.diagnostics);
        // The whitened grid may read several blocks: all of them are kept.
        let whitened_layers = self
            .model
            .whitened_grid()
            .filter(|_| tasks.iter().any(|t| t.pooling == Pooling::WhitenedGrid))
            .map(|w| w.spec.layers());
        let keep = Keep {
            outputs: tasks
                .iter()
                .flat_map(|t| [t.layer, t.pooled_from])
                .flatten()
                .chain(whitened_layers.into_iter().flatten())
                .collect(),
            attention: tasks.iter().filter_map(|t| t.attention_layer).collect(),
            diagnostics: requested,
            diagnostics_images: None,
        };
        // Only as far as the deepest block kept when no task reads the final latent (the
        // whitened grid of early blocks, any `layer`'s pooling): the rest would be discarded.
        let needs_latent = requested
            || tasks
                .iter()
                .any(|t| t.pooled_from.is_none() || (t.patch_tokens && t.layer.is_none()));
        let encoded = if needs_latent {
            self.model.encode_keeping(&input, None, &keep)?
        } else {
            self.model.encode_through(&input, &keep)?
        };
        // Sampled for the gauges only: a traced pass over a few images (the gauges are
        // batch means), off the fast path; nobody asked, so a failure must not fail the batch.
        let sampled = if sample && !requested {
            let few = input.narrow(0, 0, input.dim(0)?.min(SAMPLED_IMAGES))?;
            let diagnostics = Keep {
                diagnostics: true,
                ..Keep::default()
            };
            match self.model.encode_through(&few, &diagnostics) {
                Ok(e) => e.diagnostics,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a diagnostics sample");
                    None
                }
            }
        } else if sample {
            encoded.diagnostics.clone()
        } else {
            None
        };
        let latent = encoded.latent.as_ref();
        let mut pooled = BTreeMap::new();
        let outputs = &encoded.outputs;
        if let Some(latent) = latent {
            pooled.insert(None, Pooled::of(&self.model, latent, outputs, tasks, None)?);
        }
        for (&l, tokens) in outputs {
            let of_l = Pooled::of(&self.model, tokens, outputs, tasks, Some(l))?;
            pooled.insert(Some(l), of_l);
        }
        let ntok = self.facts.config.seq_len();
        let heads = self.facts.config.heads;
        let mut attention_rows = BTreeMap::new();
        for (&l, attn) in &encoded.attention {
            // [B, H, N, N] → row 0 (cls), columns 1.. (patches): [B, H, L].
            let rows = attn.i((.., .., 0, 1..ntok))?.contiguous()?;
            attention_rows.insert(l, host(&rows)?);
        }
        let per_image_attention = heads * (ntok - 1);
        let mut embeddings = Vec::with_capacity(tasks.len());
        for (b, task) in tasks.iter().enumerate() {
            let mut values = pooled[&task.pooled_from].row(task.pooling, b);
            if task.normalize {
                let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                values.iter_mut().for_each(|v| *v /= norm);
            }
            let patch_tokens = if task.patch_tokens {
                let source = match task.layer {
                    None => latent.expect("kept: a task reads the latent"),
                    Some(l) => &encoded.outputs[&l],
                };
                host(&source.i((b, 1..ntok))?)?
            } else {
                vec![]
            };
            embeddings.push(Embedding {
                values,
                patch_tokens,
                diagnostics: ImageDiagnostics::asked_for(
                    encoded.diagnostics.as_deref(),
                    b,
                    task.diagnostics,
                ),
                attention: task.attention_layer.map(|l| AttentionMap {
                    layer: l,
                    heads,
                    cls_to_patches: attention_rows[&l]
                        [b * per_image_attention..(b + 1) * per_image_attention]
                        .to_vec(),
                }),
            });
        }
        Ok(EmbedOutputs {
            embeddings,
            sampled,
        })
    }

    fn complete(
        &self,
        pixels: PixelBatch<'_>,
        tasks: &[&CompleteTask],
    ) -> Result<Vec<CompletedPixels>, ServeError> {
        let input = self.input(pixels)?;
        let mask = Mask::stack(tasks.iter().map(|t| &t.mask));
        let keep = Keep {
            diagnostics: tasks.iter().any(|t| t.diagnostics),
            ..Keep::default()
        };
        let (out, encoded) = self.model.complete_keeping(&input, &mask, &keep)?;
        // Masked-patch MSE per image, on the device: Σ_l m·mean_k (pred − x)² / Σ_l m.
        let target = self.model.patchify(&input)?;
        let per_patch = (&out.pred - &target)?.sqr()?.mean(D::Minus1)?;
        let mse = ((per_patch * &out.mask)?.sum(1)? / out.mask.sum(1)?)?;
        let mse: Vec<f32> = mse.to_vec1()?;
        let plane = 3 * self.facts.config.img_size * self.facts.config.img_size;
        let reconstruction = host(&out.reconstruction)?;
        let composite = host(&out.composite)?;
        Ok(tasks
            .iter()
            .enumerate()
            .map(|(b, task)| CompletedPixels {
                reconstruction: reconstruction[b * plane..(b + 1) * plane].to_vec(),
                composite: composite[b * plane..(b + 1) * plane].to_vec(),
                masked_patch_mse: mse[b],
                diagnostics: ImageDiagnostics::asked_for(
                    encoded.diagnostics.as_deref(),
                    b,
                    task.diagnostics,
                ),
            })
            .collect())
    }

    fn warm_up(&self, batch: usize, decoder: bool) -> Result<(), ServeError> {
        Ok(self.model.warm_up(batch, decoder)?)
    }

    fn parallel_batches(&self) -> bool {
        matches!(self.model.device(), Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use crate_mae::{checkpoint, init, CrateMaeConfig, Precision, WeightsFormat, WeightsInfo};

    use super::*;

    fn backend(cfg: CrateMaeConfig) -> CandleBackend {
        let device = Device::Cpu;
        let weights = init::random_weights(&cfg, 7, &device).unwrap();
        let model = checkpoint::model_from_tensors(weights, &cfg, &device).unwrap();
        let facts = ModelFacts {
            config: cfg,
            weights: WeightsInfo {
                source: "random-init (seed 7)".into(),
                format: WeightsFormat::Random,
                sha256: String::new(),
                unexpected: vec![],
                recommended_pooling: None,
                small_image_fit: None,
            },
            random_seed: Some(7),
            device: "cpu".into(),
            precision: Precision::F32,
            precision_reason: "--dtype".into(),
            kernel: model.kernel(),
            recommended_pooling: Pooling::Mean,
            small_image_fit: Default::default(),
            whitened_grid: None,
        };
        CandleBackend::new(model, facts)
    }

    /// A small model shaped like the built-in one (d 128, depth 4, 32 px, patches of 4).
    fn small() -> CrateMaeConfig {
        CrateMaeConfig::built_in_shape()
    }

    fn images(cfg: &CrateMaeConfig, n: usize) -> Vec<f32> {
        (0..n * 3 * cfg.img_size * cfg.img_size)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect()
    }

    fn task(diagnostics: bool) -> EmbedTask {
        EmbedTask {
            pooling: Pooling::Mean,
            layer: None,
            pooled_from: None,
            normalize: false,
            patch_tokens: false,
            diagnostics,
            attention_layer: None,
        }
    }

    fn embed(b: &CandleBackend, data: &[f32], tasks: &[&EmbedTask]) -> Vec<Embedding> {
        let batch = PixelBatch {
            data,
            batch: tasks.len(),
        };
        b.embed(batch, tasks, false).unwrap().embeddings
    }

    /// Benchmark (not a timed test) of what the worker does with a batch of 8 where one image
    /// asks for diagnostics: the 7 others as a batch of their own on the fast path, answered
    /// first, then the one through candle's traced pass; against 8 plain images, and against
    /// all 8 traced (what such a batch cost before the split).
    /// `cargo test --release -p crate-mae-server --lib traced_split -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark"]
    fn traced_split_model_time() {
        for (name, cfg) in [
            ("built-in shape", small()),
            ("base", CrateMaeConfig::base()),
        ] {
            let b = backend(cfg.clone());
            let plane = 3 * cfg.img_size * cfg.img_size;
            let data = images(&cfg, 8);
            let (plain, traced) = (task(false), task(true));
            let rounds = if cfg.dim > 256 { 3 } else { 50 };
            // 8 plain; the 7 (their answer); the 7 then the 1; 8 traced.
            let mut best = [f64::MAX; 4];
            for _ in 0..rounds {
                let t = Instant::now();
                embed(&b, &data, &[&plain; 8]);
                best[0] = best[0].min(t.elapsed().as_secs_f64());
                let t = Instant::now();
                embed(&b, &data[plane..], &[&plain; 7]);
                best[1] = best[1].min(t.elapsed().as_secs_f64());
                embed(&b, &data[..plane], &[&traced]);
                best[2] = best[2].min(t.elapsed().as_secs_f64());
                let t = Instant::now();
                embed(&b, &data, &[&traced; 8]);
                best[3] = best[3].min(t.elapsed().as_secs_f64());
            }
            let labels = [
                "8 plain",
                "split: the 7 plain answered",
                "split: then the 1 with diagnostics",
                "unsplit: all 8 traced",
            ];
            for (label, t) in labels.iter().zip(best) {
                println!(
                    "{name}: {label}: {:.2} ms ({:.2}× 8 plain)",
                    t * 1e3,
                    t / best[0]
                );
            }
        }
    }
}
