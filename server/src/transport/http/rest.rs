//! The Open Inference Protocol's REST form, as KServe's specification writes it and Triton
//! serves it: health, server and model metadata, readiness, Triton's configuration and
//! statistics extensions, and inference with JSON tensors or Triton's binary-data extension
//! (`Inference-Header-Content-Length`: a JSON header, then each binary tensor in order).
//!
//! JSON BYTES elements are base64 (or a `data:` URI), as JSON strings cannot carry a PNG;
//! with the binary extension they are the raw length-prefixed bytes, as over gRPC. Outputs are
//! JSON unless asked for as binary (an output's `binary_data`, or the request's
//! `binary_data_output`, which Triton's HTTP client sets); BYTES outputs in JSON are base64.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::{expect_json, is_json, Guard, Http, Refusal};
use crate::engine::State as EngineState;
use crate::error::ServeError;
use crate::oip_pb as pb;
use crate::transport::oip::infer::{self, split_bytes, Data, InferRequest, Input, RequestedOutput};
use crate::transport::oip::models::{
    metadata, model_config, resolve, statistics_of, EXTENSIONS, SERVER_NAME,
};
use crate::transport::oip::params::{Param, Params};

const PROTOCOL: &str = "oip.v2.rest";

/// The binary-data extension's header: the length of the JSON part of the body.
const HEADER_LENGTH: &str = "inference-header-content-length";

pub fn routes() -> axum::Router<Arc<Http>> {
    let mut router = axum::Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/stats", get(statistics));
    // Each model route, with and without `/versions/{version}`.
    for base in ["/v2/models/{name}", "/v2/models/{name}/versions/{version}"] {
        router = router
            .route(base, get(model_metadata))
            .route(&format!("{base}/ready"), get(model_ready))
            .route(&format!("{base}/config"), get(config))
            .route(&format!("{base}/stats"), get(statistics))
            .route(&format!("{base}/infer"), post(model_infer));
    }
    router
}

/// `{"error": "<message>"}`, as the specification writes errors.
fn error_body(refusal: &Refusal) -> Value {
    json!({ "error": refusal.message() })
}

type PathParams = Path<HashMap<String, String>>;

fn name_and_version(p: &HashMap<String, String>) -> (&str, &str) {
    (
        p.get("name").map_or("", String::as_str),
        p.get("version").map_or("", String::as_str),
    )
}

fn ok(value: Value) -> Result<Response, Refusal> {
    Ok(super::json(StatusCode::OK, &value))
}

/// A health answer: 200 when true, 400 when false (the specification: a 4xx is false).
fn health(key: &str, value: bool) -> Result<Response, Refusal> {
    let status = if value {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    };
    Ok(super::json(status, &json!({ key: value })))
}

async fn live(State(http): State<Arc<Http>>, headers: HeaderMap) -> Response {
    let engine = &http.engine;
    let on = (PROTOCOL, "ServerLive");
    http.observe(on, Guard::Ops, &headers, error_body, |_| async {
        health(
            "live",
            !matches!(*engine.state().borrow(), EngineState::Failed(_)),
        )
    })
    .await
}

async fn ready(State(http): State<Arc<Http>>, headers: HeaderMap) -> Response {
    let engine = &http.engine;
    let on = (PROTOCOL, "ServerReady");
    http.observe(on, Guard::Ops, &headers, error_body, |_| async {
        health("ready", engine.serving())
    })
    .await
}

async fn model_ready(
    State(http): State<Arc<Http>>,
    Path(p): PathParams,
    headers: HeaderMap,
) -> Response {
    let engine = &http.engine;
    let on = (PROTOCOL, "ModelReady");
    http.observe(on, Guard::Ops, &headers, error_body, |_| async {
        let (name, version) = name_and_version(&p);
        // As Triton: an unknown model or version is 404; a known one that cannot serve now
        // (loading, draining) is not ready.
        let Ok(info) = engine.info() else {
            return health("ready", false);
        };
        resolve(info, name, version)?;
        health("ready", engine.serving())
    })
    .await
}

async fn server_metadata(State(http): State<Arc<Http>>, headers: HeaderMap) -> Response {
    let on = (PROTOCOL, "ServerMetadata");
    http.observe(on, Guard::Ops, &headers, error_body, |_| async {
        ok(json!({
            "name": SERVER_NAME,
            "version": env!("CARGO_PKG_VERSION"),
            "extensions": EXTENSIONS,
        }))
    })
    .await
}

fn tensors_json(tensors: &[pb::model_metadata_response::TensorMetadata]) -> Value {
    tensors
        .iter()
        .map(|t| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape}))
        .collect()
}

async fn model_metadata(
    State(http): State<Arc<Http>>,
    Path(p): PathParams,
    headers: HeaderMap,
) -> Response {
    let engine = &http.engine;
    let on = (PROTOCOL, "ModelMetadata");
    http.observe(on, Guard::Ops, &headers, error_body, |_| async {
        let (name, version) = name_and_version(&p);
        let info = engine.info()?;
        let m = metadata(info, resolve(info, name, version)?);
        ok(json!({
            "name": m.name,
            "versions": m.versions,
            "platform": m.platform,
            "inputs": tensors_json(&m.inputs),
            "outputs": tensors_json(&m.outputs),
        }))
    })
    .await
}

/// A Triton data type's JSON name (`TYPE_FP32`), as Triton's REST configuration writes it.
fn data_type(t: i32) -> String {
    pb::DataType::try_from(t)
        .map(|t| t.as_str_name().to_string())
        .unwrap_or_else(|_| "TYPE_INVALID".into())
}

/// Triton's model configuration as its REST form writes it (the protobuf's JSON, field names
/// as in the `.proto`).
fn config_json(c: &pb::ModelConfig) -> Value {
    let reshape =
        |r: &Option<pb::ModelTensorReshape>| r.as_ref().map(|r| json!({"shape": r.shape}));
    let mut value = json!({
        "name": c.name,
        "platform": c.platform,
        "backend": c.backend,
        "max_batch_size": c.max_batch_size,
        "input": c.input.iter().map(|i| {
            let format = pb::model_input::Format::try_from(i.format)
                .map(|f| f.as_str_name().to_string())
                .unwrap_or_default();
            json!({"name": i.name, "data_type": data_type(i.data_type), "format": format,
                   "dims": i.dims, "reshape": reshape(&i.reshape), "optional": i.optional})
        }).collect::<Vec<_>>(),
        "output": c.output.iter().map(|o| json!({"name": o.name, "data_type": data_type(o.data_type),
                   "dims": o.dims, "reshape": reshape(&o.reshape)})).collect::<Vec<_>>(),
        "instance_group": c.instance_group.iter().map(|g| {
            let kind = pb::model_instance_group::Kind::try_from(g.kind)
                .map(|k| k.as_str_name().to_string())
                .unwrap_or_default();
            json!({"name": g.name, "count": g.count, "kind": kind})
        }).collect::<Vec<_>>(),
        "parameters": c.parameters.iter()
            .map(|(k, v)| (k.clone(), json!({"string_value": v.string_value})))
            .collect::<Map<_, _>>(),
    });
    if let Some(pb::model_config::SchedulingChoice::DynamicBatching(b)) = &c.scheduling_choice {
        let policy = b.default_queue_policy.as_ref().map(|p| {
            json!({"timeout_action": pb::model_queue_policy::TimeoutAction::try_from(p.timeout_action)
                       .map(|a| a.as_str_name()).unwrap_or("REJECT"),
                   "default_timeout_microseconds": p.default_timeout_microseconds,
                   "allow_timeout_override": p.allow_timeout_override,
                   "max_queue_size": p.max_queue_size})
        });
        value["dynamic_batching"] = json!({
            "preferred_batch_size": b.preferred_batch_size,
            "max_queue_delay_microseconds": b.max_queue_delay_microseconds,
            "preserve_ordering": b.preserve_ordering,
            "priority_levels": b.priority_levels,
            "default_priority_level": b.default_priority_level,
            "default_queue_policy": policy,
        });
    }
    value
}

async fn config(
    State(http): State<Arc<Http>>,
    Path(p): PathParams,
    headers: HeaderMap,
) -> Response {
    let engine = &http.engine;
    let on = (PROTOCOL, "ModelConfig");
    http.observe(on, Guard::Ops, &headers, error_body, |_| async {
        let (name, version) = name_and_version(&p);
        let info = engine.info()?;
        ok(config_json(&model_config(
            info,
            resolve(info, name, version)?,
        )))
    })
    .await
}

fn statistics_json(s: &pb::ModelStatistics) -> Value {
    let d = |t: &Option<pb::StatisticDuration>| {
        let t = t.unwrap_or_default();
        json!({"count": t.count, "ns": t.ns})
    };
    let i = s.inference_stats.unwrap_or_default();
    json!({
        "name": s.name,
        "version": s.version,
        "last_inference": s.last_inference,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": d(&i.success), "fail": d(&i.fail), "queue": d(&i.queue),
            "compute_input": d(&i.compute_input), "compute_infer": d(&i.compute_infer),
            "compute_output": d(&i.compute_output), "cache_hit": d(&i.cache_hit),
            "cache_miss": d(&i.cache_miss),
        },
        "batch_stats": s.batch_stats.iter().map(|b| json!({
            "batch_size": b.batch_size, "compute_input": d(&b.compute_input),
            "compute_infer": d(&b.compute_infer), "compute_output": d(&b.compute_output),
        })).collect::<Vec<_>>(),
    })
}

/// `GET /v2/models/stats` (every model) or one model's.
async fn statistics(
    State(http): State<Arc<Http>>,
    p: Option<PathParams>,
    headers: HeaderMap,
) -> Response {
    let engine = &http.engine;
    let on = (PROTOCOL, "ModelStatistics");
    http.observe(on, Guard::Ops, &headers, error_body, |_| async {
        let p = p.map(|Path(p)| p).unwrap_or_default();
        let (name, version) = name_and_version(&p);
        let stats = statistics_of(engine, name, version)?;
        ok(json!({ "model_stats": stats.iter().map(statistics_json).collect::<Vec<_>>() }))
    })
    .await
}

async fn model_infer(
    State(http): State<Arc<Http>>,
    Path(p): PathParams,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let on = (PROTOCOL, "ModelInfer");
    let (state, sent) = (&http, &headers);
    http.observe(on, Guard::Model, &headers, error_body, |call| async move {
        let (http, headers) = (state, sent);
        let body = http.body(headers, body).await?;
        let (name, version) = name_and_version(&p);
        let (request, binary) = read_request(headers, &body, name, version)?;
        let response = infer::infer(&http.engine, request, call).await?;
        Ok(write_response(response, &binary))
    })
    .await
}

#[derive(Deserialize)]
struct JsonRequest {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Map<String, Value>,
    inputs: Vec<JsonInput>,
    #[serde(default)]
    outputs: Vec<JsonOutput>,
}

#[derive(Deserialize)]
struct JsonInput {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Map<String, Value>,
    #[serde(default)]
    data: Option<Value>,
}

#[derive(Deserialize)]
struct JsonOutput {
    name: String,
    #[serde(default)]
    parameters: Map<String, Value>,
}

/// Which outputs go back as binary: those named with `binary_data: true`, and, for the
/// rest, the request's `binary_data_output`.
struct BinaryOutputs {
    named: HashMap<String, bool>,
    default: bool,
}

impl BinaryOutputs {
    fn binary(&self, name: &str) -> bool {
        self.named.get(name).copied().unwrap_or(self.default)
    }
}

fn param(name: &str, v: &Value) -> Result<Param, Refusal> {
    Ok(match v {
        Value::Bool(b) => Param::Bool(*b),
        Value::String(s) => Param::Str(s.clone()),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Param::Int(i),
            (None, Some(u), _) => Param::Uint(u),
            (None, None, Some(f)) => Param::Double(f),
            _ => unreachable!("a JSON number is an i64, a u64 or an f64"),
        },
        other => {
            return Err(Refusal::bad_request(format!(
                "parameter `{name}` must be a bool, a number or a string, got {other}"
            )))
        }
    })
}

fn params(map: &Map<String, Value>) -> Result<Params, Refusal> {
    map.iter()
        .map(|(k, v)| Ok((k.clone(), param(k, v)?)))
        .collect()
}

fn flag(map: &Map<String, Value>, key: &str, of: &str) -> Result<Option<bool>, Refusal> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(Refusal::bad_request(format!(
            "{of}: parameter `{key}` must be a bool, got {other}"
        ))),
    }
}

/// The body as the shared request: JSON alone, or (with `Inference-Header-Content-Length`)
/// a JSON header followed by the binary tensors it sizes.
fn read_request(
    headers: &HeaderMap,
    body: &[u8],
    name: &str,
    version: &str,
) -> Result<(InferRequest, BinaryOutputs), Refusal> {
    let (header_json, mut binary) = match headers.get(HEADER_LENGTH) {
        Some(v) => {
            // The binary form is sent as octet-stream by Triton's clients, JSON by some others.
            if let Some(kind) = headers.get(header::CONTENT_TYPE) {
                if !is_json(kind) && kind != "application/octet-stream" {
                    return Err(Refusal::Http(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        format!("Content-Type {kind:?} is not supported: send application/json, or application/octet-stream with Inference-Header-Content-Length"),
                    ));
                }
            }
            let n: usize = v
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| {
                    Refusal::bad_request("Inference-Header-Content-Length must be a whole number")
                })?;
            if n > body.len() {
                return Err(Refusal::bad_request(format!(
                    "Inference-Header-Content-Length is {n} but the body is {} bytes",
                    body.len()
                )));
            }
            body.split_at(n)
        }
        None => {
            expect_json(headers)?;
            (body, &[][..])
        }
    };
    let req: JsonRequest = serde_json::from_slice(header_json).map_err(|e| {
        Refusal::bad_request(format!("the request is not valid inference JSON: {e}"))
    })?;
    let mut inputs = Vec::with_capacity(req.inputs.len());
    for input in req.inputs {
        let size = match input.parameters.get("binary_data_size") {
            None => None,
            Some(v) => Some(v.as_u64().ok_or_else(|| {
                Refusal::bad_request(format!(
                    "input `{}`: binary_data_size must be a whole number",
                    input.name
                ))
            })? as usize),
        };
        let data = match (size, input.data) {
            (Some(_), Some(_)) => {
                return Err(Refusal::bad_request(format!(
                    "input `{}` has both `data` and binary_data_size: send one",
                    input.name
                )))
            }
            (Some(n), None) => {
                if n > binary.len() {
                    return Err(Refusal::bad_request(format!(
                        "input `{}`: binary_data_size {n} but {} binary bytes are left",
                        input.name,
                        binary.len()
                    )));
                }
                let (this, rest) = binary.split_at(n);
                binary = rest;
                Data::Raw(this.to_vec())
            }
            (None, Some(data)) => json_data(&input.name, &input.datatype, data)?,
            (None, None) => Data::Empty,
        };
        inputs.push(Input {
            shared_memory: input
                .parameters
                .keys()
                .any(|k| k.starts_with("shared_memory")),
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(Refusal::bad_request(format!(
            "{} binary bytes after the last input's binary_data_size",
            binary.len()
        )));
    }
    let mut named = HashMap::new();
    let mut outputs = Vec::with_capacity(req.outputs.len());
    for o in req.outputs {
        let of = format!("output `{}`", o.name);
        if let Some(b) = flag(&o.parameters, "binary_data", &of)? {
            named.insert(o.name.clone(), b);
        }
        outputs.push(RequestedOutput {
            classification: o.parameters.contains_key("classification"),
            name: o.name,
        });
    }
    let binary = BinaryOutputs {
        named,
        default: flag(&req.parameters, "binary_data_output", "request")?.unwrap_or(false),
    };
    let request = InferRequest {
        model_name: name.into(),
        model_version: version.into(),
        id: req.id.unwrap_or_default(),
        parameters: params(&req.parameters)?,
        inputs,
        outputs,
    };
    Ok((request, binary))
}

/// A JSON tensor's `data` (flat or nested row-major): FP32 numbers, or BYTES strings as
/// base64 or `data:` URIs. Other types are left for the input check to name.
fn json_data(name: &str, datatype: &str, data: Value) -> Result<Data, Refusal> {
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    match datatype {
        "FP32" => flat
            .iter()
            .map(|v| v.as_f64().map(|f| f as f32))
            .collect::<Option<Vec<f32>>>()
            .map(Data::Fp32)
            .ok_or_else(|| Refusal::bad_request(format!("input `{name}`: FP32 data must be numbers"))),
        "BYTES" => flat
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let s = v.as_str().ok_or_else(|| {
                    Refusal::bad_request(format!("input `{name}`: BYTES data must be strings"))
                })?;
                decode_base64(s).map_err(|why| {
                    Refusal::bad_request(format!(
                        "input `{name}` element {i}: {why} (JSON BYTES elements carry a file as base64 or a data: URI)"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Data::Bytes),
        _ => Ok(Data::Empty),
    }
}

fn flatten(v: Value, out: &mut Vec<Value>) {
    match v {
        Value::Array(items) => items.into_iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

/// A file sent as text: base64, or a `data:<type>;base64,` URI (what browsers and the
/// embedding APIs send).
pub fn decode_base64(s: &str) -> Result<Vec<u8>, String> {
    let payload = match s.strip_prefix("data:") {
        Some(uri) => {
            let (meta, payload) = uri.split_once(',').ok_or("a data: URI without a comma")?;
            if !meta.ends_with(";base64") {
                return Err("a data: URI that is not base64".into());
            }
            payload
        }
        None => s,
    };
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| format!("not base64: {e}"))
}

fn json_values(o: &infer::Output) -> Result<Value, ServeError> {
    Ok(match o.datatype {
        "FP32" => o
            .raw
            .chunks_exact(4)
            .map(|b| json!(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
            .collect(),
        "BOOL" => o.raw.iter().map(|&b| json!(b != 0)).collect(),
        _ => split_bytes(&o.raw)?
            .iter()
            .map(|b| json!(base64::engine::general_purpose::STANDARD.encode(b)))
            .collect(),
    })
}

fn write_response(response: infer::InferResponse, binary: &BinaryOutputs) -> Response {
    let mut tail: Vec<u8> = Vec::new();
    let mut outputs = Vec::with_capacity(response.outputs.len());
    for o in &response.outputs {
        let mut tensor = json!({"name": o.name, "datatype": o.datatype, "shape": o.shape});
        if binary.binary(&o.name) {
            tensor["parameters"] = json!({"binary_data_size": o.raw.len()});
            tail.extend_from_slice(&o.raw);
        } else {
            // Our own outputs are well-formed; a failure here is a bug, answered as one.
            match json_values(o) {
                Ok(values) => tensor["data"] = values,
                Err(e) => {
                    return super::json(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &error_body(&Refusal::Serve(e)),
                    )
                }
            }
        }
        outputs.push(tensor);
    }
    let mut head = json!({
        "model_name": response.model_name,
        "model_version": response.model_version,
        "outputs": outputs,
    });
    if !response.id.is_empty() {
        head["id"] = json!(response.id);
    }
    if tail.is_empty() {
        return super::json(StatusCode::OK, &head);
    }
    let mut body = serde_json::to_vec(&head).expect("JSON values serialise");
    let length = body.len().to_string();
    body.extend_from_slice(&tail);
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            ),
            (
                http::HeaderName::from_static(HEADER_LENGTH),
                HeaderValue::try_from(length).expect("digits are a header value"),
            ),
        ],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_uris_and_plain_base64_decode_and_others_are_named() {
        assert_eq!(decode_base64("aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64("data:image/png;base64,aGk=").unwrap(), b"hi");
        assert!(decode_base64("data:image/png,hi")
            .unwrap_err()
            .contains("not base64"));
        assert!(decode_base64("not base64!")
            .unwrap_err()
            .contains("not base64"));
    }

    #[test]
    fn binary_sections_are_taken_in_input_order() {
        let json = br#"{"inputs":[{"name":"image","shape":[1],"datatype":"BYTES","parameters":{"binary_data_size":6}}],"outputs":[{"name":"embedding","parameters":{"binary_data":true}}]}"#;
        let mut body = json.to_vec();
        body.extend_from_slice(&[2, 0, 0, 0, b'h', b'i']);
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_LENGTH, json.len().to_string().parse().unwrap());
        let (req, binary) = read_request(&headers, &body, "m", "").unwrap();
        assert!(matches!(&req.inputs[0].data, Data::Raw(r) if r == &[2, 0, 0, 0, b'h', b'i']));
        assert!(binary.binary("embedding") && !binary.binary("other"));
        // One byte short, one byte over.
        assert!(read_request(&headers, &body[..body.len() - 1], "m", "").is_err());
        body.push(0);
        assert!(read_request(&headers, &body, "m", "").is_err());
    }

    #[test]
    fn json_responses_carry_values_and_binary_ones_their_sizes() {
        let response = || infer::InferResponse {
            model_name: "m".into(),
            model_version: "v".into(),
            id: String::new(),
            outputs: vec![infer::Output {
                name: "embedding".into(),
                datatype: "FP32",
                shape: vec![1, 2],
                raw: [1.5f32, -2.0]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            }],
        };
        let json_only = BinaryOutputs {
            named: HashMap::new(),
            default: false,
        };
        let r = write_response(response(), &json_only);
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
        let binary = BinaryOutputs {
            named: HashMap::new(),
            default: true,
        };
        let r = write_response(response(), &binary);
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/octet-stream"
        );
        assert!(r.headers().contains_key(HEADER_LENGTH));
    }
}
