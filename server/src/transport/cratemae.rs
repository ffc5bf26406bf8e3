//! `cratemae.v1.CrateMae`: this project's own API, mapped onto the engine.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::engine::{self, Call, Engine, ImageInput, MaskSpec, Priority};
use crate::error::ServeError;
use crate::pb;
use crate::transport::{deadline, identify, observe, request_id, request_span, status, CallGuard};

const PROTOCOL: &str = "cratemae.v1";

/// Requests of one stream kept in flight at once.
const STREAM_WINDOW: usize = 8;

#[derive(Clone)]
pub struct CrateMaeService {
    engine: Arc<Engine>,
}

impl CrateMaeService {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

fn image(i: pb::Image) -> Result<ImageInput, ServeError> {
    match (i.encoded.is_empty(), i.tensor) {
        (false, None) => Ok(ImageInput::Encoded(i.encoded)),
        (true, Some(t)) => Ok(ImageInput::Pixels {
            shape: t.shape,
            data: t.data,
        }),
        (false, Some(_)) => Err(ServeError::invalid(
            "set either `encoded` or `tensor`, not both",
        )),
        (true, None) => Err(ServeError::invalid(
            "image is empty: set `encoded` (PNG/JPEG bytes) or `tensor`",
        )),
    }
}

fn pooling(value: i32) -> Result<Option<crate_mae::Pooling>, ServeError> {
    match pb::Pooling::try_from(value) {
        Ok(pb::Pooling::Unspecified) => Ok(None),
        Ok(pb::Pooling::Cls) => Ok(Some(crate_mae::Pooling::Cls)),
        Ok(pb::Pooling::Mean) => Ok(Some(crate_mae::Pooling::Mean)),
        Ok(pb::Pooling::WhitenedGrid) => Ok(Some(crate_mae::Pooling::WhitenedGrid)),
        Err(_) => Err(ServeError::invalid(format!(
            "unknown pooling value {value}"
        ))),
    }
}

fn pooling_pb(p: crate_mae::Pooling) -> pb::Pooling {
    match p {
        crate_mae::Pooling::Cls => pb::Pooling::Cls,
        crate_mae::Pooling::Mean => pb::Pooling::Mean,
        crate_mae::Pooling::WhitenedGrid => pb::Pooling::WhitenedGrid,
    }
}

fn timing(t: &engine::Timing) -> pb::Timing {
    pb::Timing {
        queue_seconds: t.queue.as_secs_f64(),
        inference_seconds: t.inference.as_secs_f64(),
        batch_size: t.batch_size as u32,
    }
}

fn diagnostics(d: &[engine::ImageDiagnostics]) -> Vec<pb::LayerDiagnostics> {
    d.iter()
        .map(|l| pb::LayerDiagnostics {
            layer: l.layer as u32,
            coding_rate: l.coding_rate,
            expansion_rate: l.expansion_rate,
            rate_reduction: l.rate_reduction(),
            sparsity: l.sparsity,
        })
        .collect()
}

async fn embed(
    engine: &Engine,
    req: pb::EmbedRequest,
    call: Call,
) -> Result<pb::EmbedResponse, ServeError> {
    let images = req
        .images
        .into_iter()
        .map(image)
        .collect::<Result<Vec<_>, _>>()?;
    let result = engine
        .embed(
            engine::EmbedRequest {
                images,
                pooling: pooling(req.pooling)?,
                layer: req.layer,
                normalize: req.normalize,
                patch_tokens: req.include_patch_tokens,
                diagnostics: req.include_diagnostics,
                attention_layer: req.attention_layer,
            },
            call,
        )
        .await?;
    let cfg = engine.info()?.config();
    let dim = result.embeddings.first().map_or(0, |e| e.values.len()) as u32;
    Ok(pb::EmbedResponse {
        embeddings: result
            .embeddings
            .into_iter()
            .map(|e| pb::Embedding {
                values: e.values,
                patch_tokens: e.patch_tokens,
                diagnostics: diagnostics(&e.diagnostics),
                attention: e.attention.map(|a| pb::AttentionMap {
                    layer: a.layer as u32,
                    heads: a.heads as u32,
                    grid_size: cfg.grid_size() as u32,
                    cls_to_patches: a.cls_to_patches,
                }),
            })
            .collect(),
        dim,
        timing: Some(timing(&result.timing)),
    })
}

async fn complete(
    engine: &Engine,
    req: pb::CompleteRequest,
    call: Call,
) -> Result<pb::CompleteResponse, ServeError> {
    let input = image(
        req.image
            .ok_or_else(|| ServeError::invalid("no image: set `image`"))?,
    )?;
    let mask = if req.masked_patches.is_empty() {
        // proto3: an unset ratio reads 0, which means the default.
        let ratio = Some(req.mask_ratio).filter(|&r| r != 0.0);
        MaskSpec::random_in_request(ratio, req.seed, 0)
    } else {
        MaskSpec::Patches(req.masked_patches)
    };
    let mut result = engine
        .complete(
            engine::CompleteRequest {
                images: vec![(input, mask)],
                diagnostics: req.include_diagnostics,
            },
            call,
        )
        .await?;
    let done = result
        .images
        .pop()
        .ok_or_else(|| ServeError::internal("no completion"))?;
    Ok(pb::CompleteResponse {
        reconstruction: done.reconstruction_png,
        composite: done.composite_png,
        masked_input: done.masked_input_png,
        masked_patches: done.masked_patches,
        grid_size: engine.info()?.config().grid_size() as u32,
        masked_patch_mse: done.masked_patch_mse,
        timing: Some(timing(&result.timing)),
        diagnostics: diagnostics(&done.diagnostics),
    })
}

/// What `GetModelInfo` says.
pub fn model_info(info: &engine::ModelInfo) -> pb::ModelInfo {
    let cfg = info.config();
    let facts = &info.facts;
    let format = match facts.weights.format {
        crate_mae::WeightsFormat::Safetensors => "safetensors".to_string(),
        crate_mae::WeightsFormat::Pth { layout } => format!("pth ({layout:?})"),
        crate_mae::WeightsFormat::Random => "random-init".to_string(),
    };
    pb::ModelInfo {
        name: info.description(),
        image_size: cfg.img_size as u32,
        patch_size: cfg.patch_size as u32,
        in_chans: cfg.in_chans as u32,
        dim: cfg.dim as u32,
        depth: cfg.depth as u32,
        heads: cfg.heads as u32,
        decoder_depth: cfg.decoder_depth as u32,
        ista_step_size: cfg.ista_step_size,
        lambd: cfg.lambd,
        parameter_count: cfg.parameter_count() as u64,
        mean: cfg.mean.to_vec(),
        std: cfg.std.to_vec(),
        weights_source: facts.weights.source.clone(),
        weights_sha256: facts.weights.sha256.clone(),
        weights_format: format,
        random_weights: facts.random_seed.is_some(),
        device: facts.device.clone(),
        diagnostics_available: true,
        diagnostics: [
            "coding_rate",
            "expansion_rate",
            "rate_reduction",
            "sparsity",
        ]
        .map(String::from)
        .to_vec(),
        max_batch_size: info.max_batch_size as u32,
        max_images_per_request: info.max_images_per_request as u32,
        version: env!("CARGO_PKG_VERSION").into(),
        recommended_pooling: pooling_pb(facts.recommended_pooling) as i32,
        dtype: facts.precision.name().into(),
        workers: info.threading.workers as u32,
        threads_per_worker: info.threading.threads as u32,
        threading: info.threading_reason.clone(),
        model_name: info.name.clone(),
        model_version: info.version(),
        kernel: facts.kernel.clone(),
        dtype_reason: facts.precision_reason.clone(),
        small_image_fit: facts.small_image_fit.name().into(),
        embedding_dim: facts.embedding_dim(facts.recommended_pooling) as u32,
        whitened_grid: facts.whitened_grid.map(|w| pb::WhitenedGrid {
            layer: w.spec.layer as u32,
            grid: w.spec.grid as u32,
            dim: w.dim as u32,
            first_layer: *w.spec.layers().start() as u32,
        }),
    }
}

type EmbedStream = Pin<Box<dyn Stream<Item = Result<pb::EmbedResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::crate_mae_server::CrateMae for CrateMaeService {
    async fn embed(
        &self,
        request: Request<pb::EmbedRequest>,
    ) -> Result<Response<pb::EmbedResponse>, Status> {
        let engine = &self.engine;
        observe(engine, PROTOCOL, "Embed", request, |req, call| {
            embed(engine, req, call)
        })
        .await
    }

    type EmbedStreamStream = EmbedStream;

    /// Bulk embedding: each message is admitted as it arrives, waiting for room instead of
    /// failing (an error would end the whole stream), so a full queue paces the client.
    async fn embed_stream(
        &self,
        request: Request<Streaming<pb::EmbedRequest>>,
    ) -> Result<Response<EmbedStream>, Status> {
        if !self.engine.serving() {
            // The same refusal a unary call gets, with its reason.
            self.engine.info().map_err(status)?;
            return Err(status(ServeError::Unavailable(
                "server is not serving (shutting down or failed)".into(),
            )));
        }
        let id = request_id(&request);
        let call = Call {
            deadline: deadline(&request),
            priority: Priority::Bulk,
        };
        let span = request_span(PROTOCOL, "EmbedStream", &id, request.metadata().as_ref());
        let engine = Arc::clone(&self.engine);
        let out = request
            .into_inner()
            .map(move |msg| {
                let engine = Arc::clone(&engine);
                let span = span.clone();
                async move {
                    let mut guard = CallGuard::new(PROTOCOL, "EmbedStream", call.deadline);
                    let result = match msg {
                        Ok(req) => embed(&engine, req, call)
                            .instrument(span)
                            .await
                            .map_err(status),
                        Err(status) => Err(status),
                    };
                    guard.code = Some(
                        result
                            .as_ref()
                            .map_or_else(|s| s.code(), |_| tonic::Code::Ok),
                    );
                    result
                }
            })
            .buffered(STREAM_WINDOW);
        let mut response = Response::new(Box::pin(out) as EmbedStream);
        identify(&self.engine, &id, response.metadata_mut());
        Ok(response)
    }

    async fn complete(
        &self,
        request: Request<pb::CompleteRequest>,
    ) -> Result<Response<pb::CompleteResponse>, Status> {
        let engine = &self.engine;
        observe(engine, PROTOCOL, "Complete", request, |req, call| {
            complete(engine, req, call)
        })
        .await
    }

    async fn get_model_info(
        &self,
        request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let engine = &self.engine;
        observe(
            engine,
            PROTOCOL,
            "GetModelInfo",
            request,
            |_, _| async move { Ok(model_info(engine.info()?)) },
        )
        .await
    }
}
