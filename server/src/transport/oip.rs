//! KServe's Open Inference Protocol v2 (`inference.GRPCInferenceService`), so the server can
//! join fleets served through KServe or Triton-style tooling and answer `tritonclient` and
//! the `kserve` SDK. Same engine, same queues and admission as `cratemae.v1`.
//!
//! Two models: `<name>` (embeddings) and `<name>-complete` (masked completion). Inputs are
//! either `image`, BYTES `[B]` of PNG/JPEG files, or `pixels`, FP32 `[B, 3, S, S]` normalised
//! pixels, as `raw_input_contents` or typed `contents` (not both). Outputs are always sent as
//! `raw_output_contents` (what `tritonclient`'s `as_numpy` reads); with no `outputs` listed,
//! every output of the model, as the protocol says. Request parameters: `pooling` ("cls" |
//! "mean"), `normalize`, `layer`; `mask_ratio` (a double, or a string such as "0.5": the
//! `kserve` SDK cannot send doubles) and `seed` for completion. Where the protocol leaves
//! room, this follows Triton: an unknown model is NOT_FOUND, ModelReady included.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::engine::{self, Call, Engine, ImageInput, MaskSpec, ModelInfo, State};
use crate::error::ServeError;
use crate::oip_pb as pb;
use crate::oip_pb::infer_parameter::ParameterChoice;
use crate::oip_pb::model_infer_request::InferInputTensor;
use crate::oip_pb::model_infer_response::InferOutputTensor;
use crate::oip_pb::model_metadata_response::TensorMetadata;
use crate::transport::observe;

const PROTOCOL: &str = "oip.v2";

/// Parameters clients of the protocol attach on their own (Triton's and KServe's reserved
/// names); accepted and ignored. Any other unknown name is refused, so a typo is not
/// silently served with defaults.
const STANDARD_PARAMETERS: &[&str] = &[
    "priority",
    "timeout",
    "sequence_id",
    "sequence_start",
    "sequence_end",
    "binary_data_output",
    "headers",
];

#[derive(Clone)]
pub struct InferenceService {
    engine: Arc<Engine>,
}

impl InferenceService {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Served {
    Embed,
    Complete,
}

fn completion_name(info: &ModelInfo) -> String {
    format!("{}-complete", info.name)
}

/// Which model a name and version address.
fn resolve(info: &ModelInfo, name: &str, version: &str) -> Result<Served, ServeError> {
    let served = if name == info.name {
        Served::Embed
    } else if name == completion_name(info) {
        Served::Complete
    } else {
        return Err(ServeError::NotFound(format!(
            "model `{name}` is not served here; models: `{}` (embeddings), `{}` (masked completion)",
            info.name,
            completion_name(info)
        )));
    };
    if !version.is_empty() && version != info.version() {
        return Err(ServeError::NotFound(format!(
            "model `{name}` version `{version}` is not served; the served version is `{}`",
            info.version()
        )));
    }
    Ok(served)
}

fn tensor(name: &str, datatype: &str, shape: &[i64]) -> TensorMetadata {
    TensorMetadata {
        name: name.into(),
        datatype: datatype.into(),
        shape: shape.to_vec(),
    }
}

fn metadata(info: &ModelInfo, served: Served) -> pb::ModelMetadataResponse {
    let c = info.config();
    let (s, d, l) = (c.img_size as i64, c.dim as i64, c.num_patches() as i64);
    let inputs = vec![
        tensor("image", "BYTES", &[-1]),
        tensor("pixels", "FP32", &[-1, 3, s, s]),
    ];
    let (name, outputs) = match served {
        Served::Embed => (
            info.name.clone(),
            vec![
                tensor("embedding", "FP32", &[-1, d]),
                tensor("patch_tokens", "FP32", &[-1, l, d]),
            ],
        ),
        Served::Complete => (
            completion_name(info),
            vec![
                tensor("reconstruction", "BYTES", &[-1]),
                tensor("composite", "BYTES", &[-1]),
                tensor("mask", "BOOL", &[-1, l]),
                tensor("masked_patch_mse", "FP32", &[-1]),
            ],
        ),
    };
    pb::ModelMetadataResponse {
        name,
        versions: vec![info.version()],
        platform: "crate-mae-serve/candle".into(),
        inputs,
        outputs,
    }
}

/// A request parameter, typed.
fn parameter<'a>(
    params: &'a HashMap<String, pb::InferParameter>,
    name: &str,
) -> Option<&'a ParameterChoice> {
    params.get(name).and_then(|p| p.parameter_choice.as_ref())
}

fn integer(
    params: &HashMap<String, pb::InferParameter>,
    name: &str,
) -> Result<Option<i64>, ServeError> {
    match parameter(params, name) {
        None => Ok(None),
        Some(ParameterChoice::Int64Param(v)) => Ok(Some(*v)),
        Some(ParameterChoice::Uint64Param(v)) => i64::try_from(*v)
            .map(Some)
            .map_err(|_| ServeError::invalid(format!("parameter `{name}` is too large"))),
        Some(other) => Err(ServeError::invalid(format!(
            "parameter `{name}` must be an integer, got {other:?}"
        ))),
    }
}

fn check_parameters(
    params: &HashMap<String, pb::InferParameter>,
    served: Served,
) -> Result<(), ServeError> {
    let known: &[&str] = match served {
        Served::Embed => &["pooling", "normalize", "layer"],
        Served::Complete => &["mask_ratio", "seed"],
    };
    for name in params.keys() {
        if !known.contains(&name.as_str()) && !STANDARD_PARAMETERS.contains(&name.as_str()) {
            return Err(ServeError::invalid(format!(
                "unknown parameter `{name}`; this model takes {known:?}"
            )));
        }
    }
    Ok(())
}

/// The images of the one input, as the engine takes them.
fn images(
    req: &mut pb::ModelInferRequest,
    image_size: usize,
) -> Result<Vec<ImageInput>, ServeError> {
    if req.inputs.len() != 1 {
        return Err(ServeError::invalid(format!(
            "send exactly one input, `image` (BYTES) or `pixels` (FP32); got {}",
            req.inputs.len()
        )));
    }
    let raw = match req.raw_input_contents.len() {
        0 => None,
        1 => Some(std::mem::take(&mut req.raw_input_contents[0])),
        n => {
            return Err(ServeError::invalid(format!(
                "{n} raw_input_contents for 1 input"
            )))
        }
    };
    let input: &mut InferInputTensor = &mut req.inputs[0];
    if input
        .parameters
        .keys()
        .any(|k| k.starts_with("shared_memory"))
    {
        return Err(ServeError::invalid(
            "shared-memory inputs are not supported: send the data in the request",
        ));
    }
    let typed = input
        .contents
        .as_ref()
        .is_some_and(|c| !(c.bytes_contents.is_empty() && c.fp32_contents.is_empty()));
    if raw.is_some() && typed {
        return Err(ServeError::invalid(format!(
            "input `{}` has both raw_input_contents and typed contents: send one",
            input.name
        )));
    }
    let want = |datatype: &str| -> Result<(), ServeError> {
        if input.datatype == datatype {
            Ok(())
        } else {
            Err(ServeError::invalid(format!(
                "input `{}` must be {datatype}, got {}",
                input.name, input.datatype
            )))
        }
    };
    let shape: Vec<usize> = input
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| {
            ServeError::invalid(format!(
                "input `{}` has a negative dimension: {:?}",
                input.name, input.shape
            ))
        })?;
    let contents = input.contents.take().unwrap_or_default();
    match input.name.as_str() {
        "image" => {
            want("BYTES")?;
            let [batch] = shape[..] else {
                return Err(ServeError::invalid(format!(
                    "input `image` must have shape [B], got {:?}",
                    input.shape
                )));
            };
            let files = match raw {
                Some(raw) => split_bytes(&raw)?,
                None => contents.bytes_contents,
            };
            if files.len() != batch {
                return Err(ServeError::invalid(format!(
                    "input `image` has shape [{batch}] but {} elements",
                    files.len()
                )));
            }
            Ok(files.into_iter().map(ImageInput::Encoded).collect())
        }
        "pixels" => {
            want("FP32")?;
            let s = image_size;
            let batch = match shape[..] {
                [b, 3, h, w] if h == s && w == s => b,
                _ => {
                    return Err(ServeError::invalid(format!(
                        "input `pixels` must have shape [B, 3, {s}, {s}], got {:?}",
                        input.shape
                    )))
                }
            };
            let values: Vec<f32> = match raw {
                Some(raw) => {
                    if raw.len() % 4 != 0 {
                        return Err(ServeError::invalid(format!(
                            "input `pixels` raw contents are {} bytes, not a whole number of FP32 values",
                            raw.len()
                        )));
                    }
                    raw.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect()
                }
                None => contents.fp32_contents,
            };
            let plane = 3 * s * s;
            if batch.checked_mul(plane) != Some(values.len()) {
                return Err(ServeError::invalid(format!(
                    "input `pixels` has shape {:?} but {} values were sent",
                    input.shape,
                    values.len()
                )));
            }
            Ok(values
                .chunks(plane)
                .map(|p| ImageInput::Pixels {
                    shape: vec![3, s as u32, s as u32],
                    data: p.to_vec(),
                })
                .collect())
        }
        other => Err(ServeError::invalid(format!(
            "unknown input `{other}`: send `image` (BYTES [B], PNG/JPEG files) or `pixels` (FP32 [B, 3, {image_size}, {image_size}])"
        ))),
    }
}

/// BYTES raw contents: each element is a 4-byte little-endian length, then the bytes.
fn split_bytes(raw: &[u8]) -> Result<Vec<Vec<u8>>, ServeError> {
    let mut out = Vec::new();
    let mut rest = raw;
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_first_chunk::<4>()
            .ok_or_else(|| ServeError::invalid("BYTES raw contents end inside a length prefix"))?;
        let len = u32::from_le_bytes(*len) as usize;
        if tail.len() < len {
            return Err(ServeError::invalid(format!(
                "BYTES raw contents: an element of {len} bytes with {} left",
                tail.len()
            )));
        }
        out.push(tail[..len].to_vec());
        rest = &tail[len..];
    }
    Ok(out)
}

fn join_bytes<'a>(items: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for item in items {
        out.extend_from_slice(&(item.len() as u32).to_le_bytes());
        out.extend_from_slice(item);
    }
    out
}

fn f32_bytes<'a>(values: impl Iterator<Item = &'a f32>) -> Vec<u8> {
    values.flat_map(|v| v.to_le_bytes()).collect()
}

/// The outputs to send: those asked for, or (as the protocol says) all of them.
fn requested(req: &pb::ModelInferRequest, all: &[&str]) -> Result<Vec<String>, ServeError> {
    if req.outputs.is_empty() {
        return Ok(all.iter().map(|s| s.to_string()).collect());
    }
    req.outputs
        .iter()
        .map(|o| {
            if o.parameters.contains_key("classification") {
                return Err(ServeError::invalid(format!(
                    "output `{}`: classification outputs are not supported",
                    o.name
                )));
            }
            if all.contains(&o.name.as_str()) {
                Ok(o.name.clone())
            } else {
                Err(ServeError::invalid(format!(
                    "unknown output `{}`; this model has {all:?}",
                    o.name
                )))
            }
        })
        .collect()
}

struct Outputs {
    tensors: Vec<InferOutputTensor>,
    raw: Vec<Vec<u8>>,
}

impl Outputs {
    fn new() -> Self {
        Self {
            tensors: vec![],
            raw: vec![],
        }
    }

    fn push(&mut self, name: &str, datatype: &str, shape: Vec<i64>, raw: Vec<u8>) {
        self.tensors.push(InferOutputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            ..Default::default()
        });
        self.raw.push(raw);
    }
}

async fn infer(
    engine: &Engine,
    mut req: pb::ModelInferRequest,
    call: Call,
) -> Result<pb::ModelInferResponse, ServeError> {
    let info = engine.info()?;
    let served = resolve(info, &req.model_name, &req.model_version)?;
    check_parameters(&req.parameters, served)?;
    let cfg = info.config();
    let images = images(&mut req, cfg.img_size)?;
    let b = images.len() as i64;
    let mut out = Outputs::new();
    match served {
        Served::Embed => {
            let names = requested(&req, &["embedding", "patch_tokens"])?;
            let pooling = match parameter(&req.parameters, "pooling") {
                None => None,
                Some(ParameterChoice::StringParam(p)) => Some(
                    p.parse::<crate_mae::Pooling>()
                        .map_err(|e| ServeError::invalid(format!("parameter `pooling`: {e}")))?,
                ),
                Some(other) => {
                    return Err(ServeError::invalid(format!(
                        "parameter `pooling` must be a string (\"cls\" or \"mean\"), got {other:?}"
                    )))
                }
            };
            let normalize = match parameter(&req.parameters, "normalize") {
                None => false,
                Some(ParameterChoice::BoolParam(v)) => *v,
                Some(other) => {
                    return Err(ServeError::invalid(format!(
                        "parameter `normalize` must be a bool, got {other:?}"
                    )))
                }
            };
            let layer = integer(&req.parameters, "layer")?
                .map(|l| {
                    u32::try_from(l).map_err(|_| {
                        ServeError::invalid(format!("parameter `layer` must be ≥ 0, got {l}"))
                    })
                })
                .transpose()?;
            let result = engine
                .embed(
                    engine::EmbedRequest {
                        images,
                        pooling,
                        layer,
                        normalize,
                        patch_tokens: names.iter().any(|n| n == "patch_tokens"),
                        ..Default::default()
                    },
                    call,
                )
                .await?;
            let (d, l) = (cfg.dim as i64, cfg.num_patches() as i64);
            for name in &names {
                let e = &result.embeddings;
                match name.as_str() {
                    "embedding" => out.push(
                        name,
                        "FP32",
                        vec![b, d],
                        f32_bytes(e.iter().flat_map(|e| &e.values)),
                    ),
                    _ => out.push(
                        name,
                        "FP32",
                        vec![b, l, d],
                        f32_bytes(e.iter().flat_map(|e| &e.patch_tokens)),
                    ),
                }
            }
        }
        Served::Complete => {
            let all = ["reconstruction", "composite", "mask", "masked_patch_mse"];
            let names = requested(&req, &all)?;
            let ratio = match parameter(&req.parameters, "mask_ratio") {
                None => 0.75,
                Some(ParameterChoice::DoubleParam(r)) => *r as f32,
                Some(ParameterChoice::StringParam(r)) => r.trim().parse::<f32>().map_err(|_| {
                    ServeError::invalid(format!("parameter `mask_ratio`: `{r}` is not a number"))
                })?,
                Some(other) => {
                    return Err(ServeError::invalid(format!(
                        "parameter `mask_ratio` must be a double or a decimal string, got {other:?}"
                    )))
                }
            };
            let seed = integer(&req.parameters, "seed")?.unwrap_or(0) as u64;
            let result = engine
                .complete(
                    engine::CompleteRequest {
                        images: images
                            .into_iter()
                            .enumerate()
                            .map(|(i, image)| {
                                (
                                    image,
                                    MaskSpec::Random {
                                        ratio,
                                        seed: seed.wrapping_add(i as u64),
                                    },
                                )
                            })
                            .collect(),
                        diagnostics: false,
                    },
                    call,
                )
                .await?;
            let l = cfg.num_patches();
            let done = &result.images;
            for name in &names {
                match name.as_str() {
                    "reconstruction" => out.push(
                        name,
                        "BYTES",
                        vec![b],
                        join_bytes(done.iter().map(|c| c.reconstruction_png.as_slice())),
                    ),
                    "composite" => out.push(
                        name,
                        "BYTES",
                        vec![b],
                        join_bytes(done.iter().map(|c| c.composite_png.as_slice())),
                    ),
                    "mask" => {
                        let mut mask = vec![0u8; done.len() * l];
                        for (i, c) in done.iter().enumerate() {
                            for &p in &c.masked_patches {
                                mask[i * l + p as usize] = 1;
                            }
                        }
                        out.push(name, "BOOL", vec![b, l as i64], mask)
                    }
                    _ => out.push(
                        name,
                        "FP32",
                        vec![b],
                        f32_bytes(done.iter().map(|c| &c.masked_patch_mse)),
                    ),
                }
            }
        }
    }
    Ok(pb::ModelInferResponse {
        model_name: req.model_name,
        model_version: info.version(),
        id: req.id,
        parameters: HashMap::new(),
        outputs: out.tensors,
        raw_output_contents: out.raw,
    })
}

#[tonic::async_trait]
impl pb::grpc_inference_service_server::GrpcInferenceService for InferenceService {
    async fn server_live(
        &self,
        request: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        let engine = &self.engine;
        observe(engine, PROTOCOL, "ServerLive", request, |_, _| async move {
            let live = !matches!(*engine.state().borrow(), State::Failed(_));
            Ok(pb::ServerLiveResponse { live })
        })
        .await
    }

    async fn server_ready(
        &self,
        request: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        let engine = &self.engine;
        observe(
            engine,
            PROTOCOL,
            "ServerReady",
            request,
            |_, _| async move {
                Ok(pb::ServerReadyResponse {
                    ready: engine.serving(),
                })
            },
        )
        .await
    }

    async fn model_ready(
        &self,
        request: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let engine = &self.engine;
        observe(
            engine,
            PROTOCOL,
            "ModelReady",
            request,
            |req, _| async move {
                // As Triton: an unknown model or version is NOT_FOUND; a known one that cannot
                // serve now (loading, draining) is `ready: false`.
                let Ok(info) = engine.info() else {
                    return Ok(pb::ModelReadyResponse { ready: false });
                };
                resolve(info, &req.name, &req.version)?;
                Ok(pb::ModelReadyResponse {
                    ready: engine.serving(),
                })
            },
        )
        .await
    }

    async fn server_metadata(
        &self,
        request: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        observe(
            &self.engine,
            PROTOCOL,
            "ServerMetadata",
            request,
            |_, _| async move {
                Ok(pb::ServerMetadataResponse {
                    name: "crate-mae-serve".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    extensions: vec![],
                })
            },
        )
        .await
    }

    async fn model_metadata(
        &self,
        request: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let engine = &self.engine;
        observe(
            engine,
            PROTOCOL,
            "ModelMetadata",
            request,
            |req, _| async move {
                let info = engine.info()?;
                Ok(metadata(info, resolve(info, &req.name, &req.version)?))
            },
        )
        .await
    }

    async fn model_infer(
        &self,
        request: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let engine = &self.engine;
        observe(engine, PROTOCOL, "ModelInfer", request, |req, call| {
            infer(engine, req, call)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_elements_round_trip_through_length_prefixes() {
        let items: Vec<&[u8]> = vec![b"png-one", b"", b"three"];
        let raw = join_bytes(items.iter().copied());
        assert_eq!(&raw[..4], &7u32.to_le_bytes());
        let back = split_bytes(&raw).unwrap();
        assert_eq!(back, items.iter().map(|i| i.to_vec()).collect::<Vec<_>>());
        assert!(split_bytes(&raw[..raw.len() - 1]).is_err());
        assert!(split_bytes(&[1, 0]).is_err());
    }
}
