//! What goes into the engine and what comes out: plain Rust types, no transport in sight.
//! The transports (cratemae.v1, the Open Inference Protocol) map their messages onto these.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate_mae::{CrateMaeConfig, LayerDiagnostics, Mask, Pooling, Precision, WeightsInfo};

/// One image as a client sent it.
#[derive(Debug, Clone)]
pub enum ImageInput {
    /// PNG or JPEG bytes.
    Encoded(Vec<u8>),
    /// Already preprocessed pixels: `[3, S, S]`, normalised with the model's mean/std.
    Pixels { shape: Vec<u32>, data: Vec<f32> },
}

/// Embedding options as requested; [`crate::engine::Engine::embed`] checks them against the model.
#[derive(Debug, Clone, Default)]
pub struct EmbedRequest {
    pub images: Vec<ImageInput>,
    /// `None`: the model's recommended pooling.
    pub pooling: Option<Pooling>,
    /// Pool this encoder layer's output (0-based) instead of the final tokens.
    pub layer: Option<u32>,
    pub normalize: bool,
    pub patch_tokens: bool,
    pub diagnostics: bool,
    pub attention_layer: Option<u32>,
}

/// Which patches a completion hides.
#[derive(Debug, Clone)]
pub enum MaskSpec {
    /// `ratio` of the patches, chosen by a seeded random draw.
    Random { ratio: f32, seed: u64 },
    /// Exactly these (row-major) patch indices.
    Patches(Vec<u32>),
}

impl MaskSpec {
    /// The mask ratio a completion uses when the request names none (the paper's 0.75).
    pub const DEFAULT_RATIO: f32 = 0.75;

    /// The random mask of image `index` in a request that gives one `seed` for all its
    /// images: `seed + index`, so a request's masks differ from each other and the same
    /// request always gets the same masks. Every protocol and client draws masks this way.
    pub fn random_in_request(ratio: Option<f32>, seed: u64, index: usize) -> Self {
        Self::Random {
            ratio: ratio.unwrap_or(Self::DEFAULT_RATIO),
            seed: Self::seed_of(seed, index),
        }
    }

    /// The seed image `index` of a request draws its mask with (`seed + index`).
    pub fn seed_of(seed: u64, index: usize) -> u64 {
        seed.wrapping_add(index as u64)
    }
}

#[derive(Debug, Clone)]
pub struct CompleteRequest {
    /// Each image with its own mask.
    pub images: Vec<(ImageInput, MaskSpec)>,
    pub diagnostics: bool,
}

/// How the model workers compute: `workers` model threads, each with `threads` compute
/// threads of its own; or (`adaptive`) one worker per core where a batch that starts alone
/// runs on a pool of all `threads` cores and one that starts beside others on its worker's
/// own core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threading {
    pub workers: usize,
    pub threads: usize,
    pub adaptive: bool,
}

impl Threading {
    /// The CPU default: a lone batch spreads over every core; batches in flight together take
    /// one core each (no hand-offs between them). No core idles while work waits, and
    /// nothing depends on a measurement at start-up.
    pub fn adaptive(cores: usize) -> Self {
        Self {
            workers: cores,
            threads: cores,
            adaptive: true,
        }
    }
}

impl std::fmt::Display for Threading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.adaptive {
            write!(
                f,
                "{} workers, a lone batch on {} threads",
                self.workers, self.threads
            )
        } else {
            write!(f, "{}x{}", self.workers, self.threads)
        }
    }
}

/// What the backend says about the model it loaded.
#[derive(Debug, Clone)]
pub struct ModelFacts {
    pub config: CrateMaeConfig,
    pub weights: WeightsInfo,
    /// The seed of a random-init model (not trained).
    pub random_seed: Option<u64>,
    pub device: String,
    pub precision: Precision,
    /// Why this precision (`--dtype`, or what `--dtype auto` measured).
    pub precision_reason: String,
    /// What computes the products (`CrateMae::kernel`).
    pub kernel: String,
    pub recommended_pooling: Pooling,
    /// How images smaller than the model's input are fitted to it.
    pub small_image_fit: crate_mae::checkpoint::SmallImageFit,
    /// The whitened grid readout the weights ship, if any.
    pub whitened_grid: Option<WhitenedGridFacts>,
}

/// Where a model's whitened grid readout reads and how wide it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WhitenedGridFacts {
    pub spec: crate_mae::WhitenedGridSpec,
    pub dim: usize,
}

impl ModelFacts {
    /// Values per embedding with `pooling`.
    pub fn embedding_dim(&self, pooling: Pooling) -> usize {
        match (pooling, self.whitened_grid) {
            (Pooling::WhitenedGrid, Some(w)) => w.dim,
            _ => self.config.dim,
        }
    }
}

/// Everything a client may want to know about what is served.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub facts: ModelFacts,
    /// The name clients address the model by (Open Inference Protocol `model_name`).
    pub name: String,
    pub threading: Threading,
    /// How the threading was chosen ("measured at warm-up", "--threading").
    pub threading_reason: String,
    pub max_batch_size: usize,
    pub max_images_per_request: usize,
    /// How long a batch may wait for more work.
    pub max_batch_delay: Duration,
    /// Images admitted at once (queued or running).
    pub max_queue_images: usize,
}

impl ModelInfo {
    pub fn config(&self) -> &CrateMaeConfig {
        &self.facts.config
    }

    /// Identifies the weights: their SHA-256, or the seed of a random-init model. Two
    /// responses with different versions came from different models.
    pub fn version(&self) -> String {
        match self.facts.random_seed {
            Some(seed) => format!("random-init-seed-{seed}"),
            None => self.facts.weights.sha256.clone(),
        }
    }

    /// A human description, e.g. `crate-mae d128 depth4 heads4 32px/p4`.
    pub fn description(&self) -> String {
        let c = self.config();
        format!(
            "crate-mae d{} depth{} heads{} {}px/p{}{}",
            c.dim,
            c.depth,
            c.heads,
            c.img_size,
            c.patch_size,
            if self.facts.random_seed.is_some() {
                " (RANDOM INIT, not trained)"
            } else {
                ""
            }
        )
    }
}

/// Per-layer diagnostics of one image.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageDiagnostics {
    pub layer: usize,
    pub coding_rate: f64,
    pub expansion_rate: f64,
    pub sparsity: f64,
}

impl ImageDiagnostics {
    pub fn rate_reduction(&self) -> f64 {
        self.expansion_rate - self.coding_rate
    }

    /// Image `b`'s diagnostics from a batch's, if it asked for them (and they were computed).
    pub fn asked_for(layers: Option<&[LayerDiagnostics]>, b: usize, asked: bool) -> Vec<Self> {
        match (asked, layers) {
            (true, Some(layers)) => Self::of_image(layers, b),
            _ => vec![],
        }
    }

    /// Image `b`'s row of batch diagnostics.
    pub fn of_image(layers: &[LayerDiagnostics], b: usize) -> Vec<Self> {
        layers
            .iter()
            .map(|l| Self {
                layer: l.layer,
                coding_rate: l.coding_rate[b],
                expansion_rate: l.expansion_rate[b],
                sparsity: l.sparsity[b],
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AttentionMap {
    pub layer: usize,
    pub heads: usize,
    /// `[heads, L]`: attention of the cls token to each patch.
    pub cls_to_patches: Vec<f32>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Embedding {
    pub values: Vec<f32>,
    /// `[L, d]` row-major, when requested.
    pub patch_tokens: Vec<f32>,
    pub diagnostics: Vec<ImageDiagnostics>,
    pub attention: Option<AttentionMap>,
}

/// One completed image, as the model returns it (normalised pixels).
#[derive(Debug, Clone, Default)]
pub struct CompletedPixels {
    /// `[3, S, S]` normalised prediction for every patch.
    pub reconstruction: Vec<f32>,
    /// `[3, S, S]` visible input + predicted masked patches.
    pub composite: Vec<f32>,
    pub masked_patch_mse: f32,
    pub diagnostics: Vec<ImageDiagnostics>,
}

/// One completed image, ready to send.
#[derive(Debug, Clone)]
pub struct Completed {
    pub reconstruction_png: Vec<u8>,
    pub composite_png: Vec<u8>,
    pub masked_input_png: Vec<u8>,
    /// Ascending indices of the hidden patches.
    pub masked_patches: Vec<u32>,
    pub masked_patch_mse: f32,
    pub diagnostics: Vec<ImageDiagnostics>,
}

/// Where a request's time went (the slowest of its images).
#[derive(Debug, Clone, Copy, Default)]
pub struct Timing {
    /// Admitted → its batch started.
    pub queue: Duration,
    /// The batch's model time.
    pub inference: Duration,
    pub batch_size: usize,
    /// Decoding and preprocessing the request's images.
    pub preprocess: Duration,
}

impl Timing {
    /// The slowest image's timing (a request is answered when its last image is).
    pub fn max(self, other: Timing) -> Timing {
        Timing {
            queue: self.queue.max(other.queue),
            inference: self.inference.max(other.inference),
            batch_size: self.batch_size.max(other.batch_size),
            preprocess: self.preprocess.max(other.preprocess),
        }
    }
}

#[derive(Debug, Clone)]
pub struct EmbedResult {
    pub embeddings: Vec<Embedding>,
    pub timing: Timing,
}

#[derive(Debug, Clone)]
pub struct CompleteResult {
    pub images: Vec<Completed>,
    pub timing: Timing,
}

/// The resolved per-image embedding task, shared by a request's images.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbedTask {
    pub pooling: Pooling,
    /// Whose tokens `patch_tokens` are (None: the final latent).
    pub layer: Option<usize>,
    /// Whose tokens the embedding pools: `layer`, except the whitened grid's own block.
    pub pooled_from: Option<usize>,
    pub normalize: bool,
    pub patch_tokens: bool,
    pub diagnostics: bool,
    pub attention_layer: Option<usize>,
}

/// One image's completion task.
#[derive(Debug, Clone, PartialEq)]
pub struct CompleteTask {
    /// One row: this image's mask.
    pub mask: Mask,
    pub diagnostics: bool,
}

#[derive(Debug, Clone)]
pub enum Task {
    Embed(Arc<EmbedTask>),
    Complete(CompleteTask),
}

/// How a call is treated: online calls (unary, either protocol) are refused at once when the
/// server is full (RESOURCE_EXHAUSTED, retry elsewhere) and go first in the batcher; bulk work
/// (`EmbedStream`) waits for room, paced by flow control, may hold at most
/// [`BULK_ADMISSION_SHARE`](crate::engine::admission::BULK_ADMISSION_SHARE) of the admission
/// slots, and takes the batches online work leaves (at least one in
/// [`ONLINE_STREAK`](crate::engine::queue::ONLINE_STREAK) + 1 while both wait, so it never
/// starves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Online,
    Bulk,
}

/// Per-call settings from the transport.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    pub deadline: Option<Instant>,
    pub priority: Priority,
}
