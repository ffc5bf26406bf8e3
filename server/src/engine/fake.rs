//! A stand-in model for engine tests: instant, deterministic, and able to fail on cue
//! (panic, out of memory, lost device) the way a real device can.

use std::sync::Mutex;
use std::time::Duration;

use crate_mae::checkpoint::{WeightsFormat, WeightsInfo};
use crate_mae::{CrateMaeConfig, Pooling, Precision};

use crate::engine::backend::{Backend, EmbedOutputs, PixelBatch};
use crate::engine::types::{CompleteTask, CompletedPixels, EmbedTask, Embedding, ModelFacts};
use crate::error::ServeError;

/// Trigger values are matched against an image's first pixel.
#[derive(Debug, Default)]
pub struct Faults {
    pub panic_on: Option<f32>,
    pub lose_device_on: Option<f32>,
    /// Batches larger than this run out of memory (0: every batch does).
    pub memory_for: Option<usize>,
    /// Time each batch takes.
    pub batch_time: Duration,
}

pub struct FakeModel {
    facts: ModelFacts,
    faults: Faults,
    /// Sizes of the batches computed (or attempted).
    pub batches: Mutex<Vec<usize>>,
    /// Whether each embedding batch computed had an image asking for diagnostics.
    pub traced: Mutex<Vec<bool>>,
}

pub const IMAGE_SIZE: usize = 8;
pub const DIM: usize = 4;

impl FakeModel {
    pub fn new(faults: Faults) -> Self {
        let config = CrateMaeConfig {
            img_size: IMAGE_SIZE,
            patch_size: 4,
            dim: DIM,
            depth: 2,
            heads: 2,
            decoder_depth: 1,
            decoder_num_heads: 2,
            ..CrateMaeConfig::tiny()
        };
        Self {
            facts: ModelFacts {
                config,
                weights: WeightsInfo {
                    source: "fake".into(),
                    format: WeightsFormat::Random,
                    sha256: "f".repeat(64),
                    unexpected: vec![],
                    recommended_pooling: None,
                    small_image_fit: None,
                },
                random_seed: None,
                device: "fake".into(),
                precision: Precision::F32,
                precision_reason: "--dtype".into(),
                kernel: "fake".into(),
                recommended_pooling: Pooling::Mean,
                small_image_fit: Default::default(),
                whitened_grid: None,
            },
            faults,
            batches: Mutex::new(vec![]),
            traced: Mutex::new(vec![]),
        }
    }

    fn attempt(&self, pixels: &PixelBatch<'_>) -> Result<(), ServeError> {
        self.batches.lock().unwrap().push(pixels.batch);
        std::thread::sleep(self.faults.batch_time);
        let plane = pixels.data.len() / pixels.batch;
        let firsts = || pixels.data.chunks(plane).map(|image| image[0]);
        if let Some(v) = self.faults.panic_on {
            if firsts().any(|x| x == v) {
                panic!("fault injection: trigger value seen");
            }
        }
        if let Some(v) = self.faults.lose_device_on {
            if firsts().any(|x| x == v) {
                return Err(crate_mae::ModelError::DeviceLost(
                    "CUDA_ERROR_ILLEGAL_ADDRESS (fake)".into(),
                )
                .into());
            }
        }
        if self.faults.memory_for.is_some_and(|m| pixels.batch > m) {
            return Err(crate_mae::ModelError::OutOfMemory(
                "CUDA_ERROR_OUT_OF_MEMORY (fake)".into(),
            )
            .into());
        }
        Ok(())
    }
}

/// The mean of an image's pixels: what the fake "embeds" with mean pooling.
pub fn mean(image: &[f32]) -> f32 {
    image.iter().sum::<f32>() / image.len() as f32
}

impl Backend for FakeModel {
    fn facts(&self) -> &ModelFacts {
        &self.facts
    }

    fn embed(
        &self,
        pixels: PixelBatch<'_>,
        tasks: &[&EmbedTask],
        _sample: bool,
    ) -> Result<EmbedOutputs, ServeError> {
        self.attempt(&pixels)?;
        let traced = tasks.iter().any(|t| t.diagnostics);
        self.traced.lock().unwrap().push(traced);
        let plane = pixels.data.len() / pixels.batch;
        let embeddings = pixels
            .data
            .chunks(plane)
            .zip(tasks)
            .map(|(image, task)| Embedding {
                // "cls" is the first pixel, "mean" the mean: enough to tell them apart.
                values: vec![
                    match task.pooling {
                        Pooling::Cls => image[0],
                        Pooling::Mean => mean(image),
                        // The engine refuses it: the fake ships no whitened grid.
                        Pooling::WhitenedGrid => -mean(image),
                    };
                    DIM
                ],
                ..Embedding::default()
            })
            .collect();
        Ok(EmbedOutputs {
            embeddings,
            sampled: None,
        })
    }

    fn complete(
        &self,
        pixels: PixelBatch<'_>,
        _tasks: &[&CompleteTask],
    ) -> Result<Vec<CompletedPixels>, ServeError> {
        self.attempt(&pixels)?;
        let plane = pixels.data.len() / pixels.batch;
        Ok(pixels
            .data
            .chunks(plane)
            .map(|image| CompletedPixels {
                reconstruction: image.to_vec(),
                composite: image.to_vec(),
                masked_patch_mse: 0.0,
                diagnostics: vec![],
            })
            .collect())
    }

    fn warm_up(&self, _batch: usize, _decoder: bool) -> Result<(), ServeError> {
        Ok(())
    }

    fn parallel_batches(&self) -> bool {
        false
    }
}
