//! KServe's Open Inference Protocol v2 (`inference.GRPCInferenceService`), so the server can
//! join fleets served through KServe or Triton-style tooling and answer `tritonclient` and
//! the `kserve` SDK. Same engine, same queues and admission as `cratemae.v1`.
//!
//! Two models: `<name>` (embeddings) and `<name>-complete` (masked completion). Inputs are
//! either `image`, BYTES `[B]` of PNG/JPEG files, or `pixels`, FP32 `[B, 3, S, S]` normalised
//! pixels, as `raw_input_contents` or typed `contents` (not both); `image` may also be shaped
//! `[B, 1]`, as Triton's tools send a batched one-element input. Both inputs are `optional` in
//! the model configuration: a request sends exactly one. Outputs are always sent as
//! `raw_output_contents` (what `tritonclient`'s `as_numpy` reads); with no `outputs` listed,
//! every output the metadata lists, as the protocol says. `patch_tokens` (`[B, L, D]`, 150×
//! the size of an embedding) is not listed: it is returned only when named in `outputs`, so
//! clients and benchmarks that ask for every listed output measure embeddings. Request
//! parameters: `pooling` ("cls" | "mean"), `normalize`, `layer`; `mask_ratio` (a double, or a
//! string such as "0.5": the `kserve` SDK cannot send doubles) and `seed` for completion;
//! Triton's `timeout` (microseconds) is a deadline like `grpc-timeout`, the earlier wins, and
//! its `priority` picks the level the configuration lists (1 online, 2 bulk).
//! Where the protocol leaves room, this follows Triton: an unknown model is NOT_FOUND,
//! ModelReady included. Triton's ModelConfig and ModelStatistics extensions are answered too.

use std::collections::HashMap;
use std::sync::Arc;

use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use crate::engine::queue::Kind;
use crate::engine::stats::Totals;
use crate::engine::{self, Call, Engine, ImageInput, MaskSpec, ModelInfo, State};
use crate::error::ServeError;
use crate::oip_pb as pb;
use crate::oip_pb::infer_parameter::ParameterChoice;
use crate::oip_pb::model_infer_request::InferInputTensor;
use crate::oip_pb::model_infer_response::InferOutputTensor;
use crate::oip_pb::model_metadata_response::TensorMetadata;
use crate::transport::observe;

const PROTOCOL: &str = "oip.v2";

/// The reserved parameters this server acts on (`with_call_parameters`), also listed in the
/// model configuration.
const HONOURED_PARAMETERS: &[&str] = &["timeout", "priority"];

/// Parameters clients of the protocol attach on their own (Triton's and KServe's reserved
/// names, and any `triton_`-prefixed one, which Triton reserves for its clients, e.g.
/// perf_analyzer's `triton_enable_empty_final_response`); accepted and ignored, except the
/// [`HONOURED_PARAMETERS`]. Any other unknown name is refused, so a typo is not silently
/// served with defaults.
const STANDARD_PARAMETERS: &[&str] = &[
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

impl Served {
    fn kind(self) -> Kind {
        match self {
            Served::Embed => Kind::Embed,
            Served::Complete => Kind::Complete,
        }
    }

    /// The outputs the metadata lists: sent when a request names none.
    fn outputs(self) -> &'static [&'static str] {
        match self {
            Served::Embed => &["embedding"],
            Served::Complete => &["reconstruction", "composite", "mask", "masked_patch_mse"],
        }
    }

    /// The request parameters of this model's own (beside the protocol's reserved ones).
    fn parameters(self) -> &'static [&'static str] {
        match self {
            Served::Embed => &["pooling", "normalize", "layer"],
            Served::Complete => &["mask_ratio", "seed"],
        }
    }

    /// Outputs sent only when named.
    fn on_request(self) -> &'static [&'static str] {
        match self {
            Served::Embed => &["patch_tokens"],
            Served::Complete => &[],
        }
    }
}

/// The one place each served model's input, output and parameter shapes are written down;
/// the metadata and the model configuration are both read off it.
struct Tensor {
    name: &'static str,
    datatype: &'static str,
    /// Without the batch dimension.
    dims: Vec<i64>,
}

fn inputs(info: &ModelInfo) -> [Tensor; 2] {
    let s = info.config().img_size as i64;
    [
        // One file per image, written as Triton writes a batched one-element input; `[B]`
        // is accepted too.
        Tensor {
            name: "image",
            datatype: "BYTES",
            dims: vec![1],
        },
        Tensor {
            name: "pixels",
            datatype: "FP32",
            dims: vec![3, s, s],
        },
    ]
}

fn outputs(info: &ModelInfo, served: Served) -> Vec<Tensor> {
    let c = info.config();
    let (d, l) = (c.dim as i64, c.num_patches() as i64);
    served
        .outputs()
        .iter()
        .map(|&name| {
            let (datatype, dims) = match name {
                "embedding" => ("FP32", vec![d]),
                "mask" => ("BOOL", vec![l]),
                "masked_patch_mse" => ("FP32", vec![]),
                _ => ("BYTES", vec![]),
            };
            Tensor {
                name,
                datatype,
                dims,
            }
        })
        .collect()
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
    if !version.is_empty() && version != info.version() && version != TRITON_VERSION {
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

fn model_name(info: &ModelInfo, served: Served) -> String {
    match served {
        Served::Embed => info.name.clone(),
        Served::Complete => completion_name(info),
    }
}

const PLATFORM: &str = "crate-mae-serve/candle";

/// Triton's tools parse model versions as integers (perf_analyzer aborts on any other), so
/// statistics report the served model as version `1`, which every rpc also accepts as an
/// alias of the weights' SHA-256 that metadata and responses carry.
const TRITON_VERSION: &str = "1";

fn metadata(info: &ModelInfo, served: Served) -> pb::ModelMetadataResponse {
    let batched = |t: &Tensor| {
        let shape: Vec<i64> = std::iter::once(-1).chain(t.dims.iter().copied()).collect();
        tensor(t.name, t.datatype, &shape)
    };
    pb::ModelMetadataResponse {
        name: model_name(info, served),
        versions: vec![info.version()],
        platform: PLATFORM.into(),
        inputs: inputs(info).iter().map(batched).collect(),
        outputs: outputs(info, served).iter().map(batched).collect(),
    }
}

/// Triton's model configuration, as its tools read it: both inputs optional (a request sends
/// one), the batch limit, and the batcher's real settings.
fn model_config(info: &ModelInfo, served: Served) -> pb::ModelConfig {
    use pb::model_instance_group::Kind as Group;
    let data_type = |datatype: &str| {
        (match datatype {
            "FP32" => pb::DataType::TypeFp32,
            "BOOL" => pb::DataType::TypeBool,
            _ => pb::DataType::TypeString,
        }) as i32
    };
    // A one-value-per-image output (sent as [B]) is written as Triton writes one: dims [1],
    // reshaped to [].
    let dims = |t: &Tensor| -> (Vec<i64>, Option<pb::ModelTensorReshape>) {
        if t.dims.is_empty() {
            (vec![1], Some(pb::ModelTensorReshape { shape: vec![] }))
        } else {
            (t.dims.clone(), None)
        }
    };
    let gpu = !info.facts.device.starts_with("cpu");
    pb::ModelConfig {
        name: model_name(info, served),
        platform: PLATFORM.into(),
        backend: "crate-mae".into(),
        max_batch_size: info.max_images_per_request as i32,
        input: inputs(info)
            .iter()
            .map(|t| {
                let (dims, reshape) = dims(t);
                pb::ModelInput {
                    name: t.name.into(),
                    data_type: data_type(t.datatype),
                    format: if t.name == "pixels" {
                        pb::model_input::Format::Nchw as i32
                    } else {
                        pb::model_input::Format::None as i32
                    },
                    dims,
                    reshape,
                    optional: true,
                }
            })
            .collect(),
        output: outputs(info, served)
            .iter()
            .map(|t| {
                let (dims, reshape) = dims(t);
                pb::ModelOutput {
                    name: t.name.into(),
                    data_type: data_type(t.datatype),
                    dims,
                    reshape,
                }
            })
            .collect(),
        scheduling_choice: Some(pb::model_config::SchedulingChoice::DynamicBatching(
            pb::ModelDynamicBatching {
                preferred_batch_size: vec![info.max_batch_size as i32],
                max_queue_delay_microseconds: info.max_batch_delay.as_micros() as u64,
                preserve_ordering: true,
                // 1: online (unary calls), 2: bulk (streams), as the batcher orders them.
                priority_levels: 2,
                default_priority_level: 1,
                default_queue_policy: Some(pb::ModelQueuePolicy {
                    timeout_action: pb::model_queue_policy::TimeoutAction::Reject as i32,
                    default_timeout_microseconds: 0,
                    allow_timeout_override: true,
                    max_queue_size: info.max_queue_images as u32,
                }),
            },
        )),
        instance_group: vec![pb::ModelInstanceGroup {
            name: model_name(info, served),
            count: info.threading.workers as i32,
            gpus: vec![],
            kind: if gpu { Group::Gpu } else { Group::Cpu } as i32,
        }],
        parameters: served
            .parameters()
            .iter()
            .chain(HONOURED_PARAMETERS)
            .map(|p| {
                (
                    format!("request_parameter.{p}"),
                    pb::ModelParameter {
                        string_value: "accepted".into(),
                    },
                )
            })
            .collect(),
    }
}

fn duration(t: Totals) -> Option<pb::StatisticDuration> {
    Some(pb::StatisticDuration {
        count: t.count,
        ns: t.ns,
    })
}

fn model_statistics(engine: &Engine, info: &ModelInfo, served: Served) -> pb::ModelStatistics {
    let s = engine.statistics(served.kind());
    pb::ModelStatistics {
        name: model_name(info, served),
        version: TRITON_VERSION.into(),
        last_inference: s.last_inference_ms,
        inference_count: s.inference_count,
        execution_count: s.execution_count,
        inference_stats: Some(pb::InferStatistics {
            success: duration(s.success),
            fail: duration(s.fail),
            queue: duration(s.queue),
            compute_input: duration(s.compute_input),
            compute_infer: duration(s.compute_infer),
            compute_output: duration(s.compute_output),
            cache_hit: duration(Totals::default()),
            cache_miss: duration(Totals::default()),
        }),
        batch_stats: s
            .batches
            .iter()
            .map(|&(size, t)| pb::InferBatchStatistics {
                batch_size: size as u64,
                compute_input: duration(Totals::default()),
                compute_infer: duration(t),
                compute_output: duration(Totals::default()),
            })
            .collect(),
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
    let known = served.parameters();
    for name in params.keys() {
        let name_str = name.as_str();
        let reserved = HONOURED_PARAMETERS.contains(&name_str)
            || STANDARD_PARAMETERS.contains(&name_str)
            || name.starts_with("triton_");
        if !known.contains(&name.as_str()) && !reserved {
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
            let batch = match shape[..] {
                [batch] | [batch, 1] => batch,
                _ => {
                    return Err(ServeError::invalid(format!(
                        "input `image` must have shape [B] or [B, 1], got {:?}",
                        input.shape
                    )))
                }
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
            "unknown input `{other}`: send `image` (BYTES [B] or [B, 1], PNG/JPEG files) or `pixels` (FP32 [B, 3, {image_size}, {image_size}])"
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

/// The outputs to send: those asked for, or (as the protocol says) all the listed ones.
fn requested(req: &pb::ModelInferRequest, served: Served) -> Result<Vec<String>, ServeError> {
    let listed = served.outputs();
    if req.outputs.is_empty() {
        return Ok(listed.iter().map(|s| s.to_string()).collect());
    }
    let known = |name: &str| listed.contains(&name) || served.on_request().contains(&name);
    req.outputs
        .iter()
        .map(|o| {
            if o.parameters.contains_key("classification") {
                return Err(ServeError::invalid(format!(
                    "output `{}`: classification outputs are not supported",
                    o.name
                )));
            }
            if known(&o.name) {
                Ok(o.name.clone())
            } else {
                Err(ServeError::invalid(format!(
                    "unknown output `{}`; this model has {listed:?}, and {:?} when named",
                    o.name,
                    served.on_request()
                )))
            }
        })
        .collect()
}

/// Triton's `timeout` request parameter (microseconds) as a deadline, the earlier of it and
/// the call's own deadline applying; and its `priority` as the model configuration lists the
/// levels (0 or 1: online, the default; 2: bulk, as a stream's work is treated).
fn with_call_parameters(
    params: &HashMap<String, pb::InferParameter>,
    mut call: Call,
) -> Result<Call, ServeError> {
    match integer(params, "priority")? {
        None | Some(0) | Some(1) => {}
        Some(2) => call.priority = engine::Priority::Bulk,
        Some(p) => {
            return Err(ServeError::invalid(format!(
                "parameter `priority` must be 1 (online, the default) or 2 (bulk), got {p}"
            )))
        }
    }
    if let Some(us) = integer(params, "timeout")? {
        let us = u64::try_from(us).map_err(|_| {
            ServeError::invalid(format!(
                "parameter `timeout` must be ≥ 0 microseconds, got {us}"
            ))
        })?;
        // 0 means "no timeout" in Triton.
        if us > 0 {
            let by_parameter = Instant::now().checked_add(Duration::from_micros(us));
            call.deadline = match (call.deadline, by_parameter) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
    }
    Ok(call)
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
    req: pb::ModelInferRequest,
    call: Call,
) -> Result<pb::ModelInferResponse, ServeError> {
    let info = engine.info()?;
    let served = resolve(info, &req.model_name, &req.model_version)?;
    check_parameters(&req.parameters, served)?;
    let given = call.deadline;
    let call = with_call_parameters(&req.parameters, call)?;
    // `observe` already answers at the call's own deadline; a second timer only for an
    // earlier one from the `timeout` parameter.
    let earlier = call.deadline.filter(|_| call.deadline != given);
    engine::within(earlier, run_infer(engine, info, served, req, call)).await
}

async fn run_infer(
    engine: &Engine,
    info: &ModelInfo,
    served: Served,
    mut req: pb::ModelInferRequest,
    call: Call,
) -> Result<pb::ModelInferResponse, ServeError> {
    let cfg = info.config();
    let images = images(&mut req, cfg.img_size)?;
    let b = images.len() as i64;
    let mut out = Outputs::new();
    match served {
        Served::Embed => {
            let names = requested(&req, served)?;
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
            let names = requested(&req, served)?;
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
                    // Triton's names for the extension rpcs answered here; perf_analyzer
                    // reads server-side statistics only when `statistics` is listed.
                    extensions: vec!["model_configuration".into(), "statistics".into()],
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

    async fn model_config(
        &self,
        request: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let engine = &self.engine;
        observe(
            engine,
            PROTOCOL,
            "ModelConfig",
            request,
            |req, _| async move {
                let info = engine.info()?;
                let served = resolve(info, &req.name, &req.version)?;
                Ok(pb::ModelConfigResponse {
                    config: Some(model_config(info, served)),
                })
            },
        )
        .await
    }

    async fn model_statistics(
        &self,
        request: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let engine = &self.engine;
        observe(
            engine,
            PROTOCOL,
            "ModelStatistics",
            request,
            |req, _| async move {
                let info = engine.info()?;
                // As Triton: no name, every model; a version without a name is refused.
                let served = if req.name.is_empty() {
                    if !req.version.is_empty() {
                        return Err(ServeError::invalid(
                            "a model version was given without a model name",
                        ));
                    }
                    vec![Served::Embed, Served::Complete]
                } else {
                    vec![resolve(info, &req.name, &req.version)?]
                };
                Ok(pb::ModelStatisticsResponse {
                    model_stats: served
                        .into_iter()
                        .map(|s| model_statistics(engine, info, s))
                        .collect(),
                })
            },
        )
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
