//! The model behind a small trait: the engine's worker threads hand it batches of
//! preprocessed pixels and get per-image outputs back. The real one is [`super::candle`]
//! (CRATE-MAE in candle); tests use a fake.

use crate_mae::LayerDiagnostics;

use crate::engine::types::{CompleteTask, CompletedPixels, EmbedTask, Embedding, ModelFacts};
use crate::error::ServeError;

/// A batch of images: `[B, 3, S, S]` normalised pixels, row-major.
pub struct PixelBatch<'a> {
    pub data: &'a [f32],
    pub batch: usize,
}

/// An embedding batch's outputs, one per image, plus the batch's diagnostics when the engine
/// sampled it for the Prometheus gauges.
pub struct EmbedOutputs {
    pub embeddings: Vec<Embedding>,
    pub sampled: Option<Vec<LayerDiagnostics>>,
}

pub trait Backend: Send + Sync + 'static {
    /// The loaded model.
    fn facts(&self) -> &ModelFacts;

    /// Embeds a batch. `sample`: also compute the batch's diagnostics for the gauges (a
    /// failure to do so must not fail the batch when no image asked for them).
    fn embed(
        &self,
        pixels: PixelBatch<'_>,
        tasks: &[&EmbedTask],
        sample: bool,
    ) -> Result<EmbedOutputs, ServeError>;

    /// Completes a batch, each image with its own mask.
    fn complete(
        &self,
        pixels: PixelBatch<'_>,
        tasks: &[&CompleteTask],
    ) -> Result<Vec<CompletedPixels>, ServeError>;

    /// Runs one batch of this size through the encoder (and the decoder, with `decoder`), so
    /// lazy allocations and kernel selection happen before the first client.
    fn warm_up(&self, batch: usize, decoder: bool) -> Result<(), ServeError>;

    /// Whether the device computes several batches at once better than one batch with all
    /// its threads (a CPU can; a GPU stream cannot).
    fn parallel_batches(&self) -> bool;
}
