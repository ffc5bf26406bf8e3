//! `POST /v1/embeddings` in the OpenAI shape, which retrieval and vector-database frameworks
//! speak to embedding servers, with images as data URIs or base64 strings (as vLLM, NV-CLIP and
//! Infinity take them); `GET /v1/models` lists the model.
//!
//! Image URLs are refused, never fetched: a server that fetches what a request names is a
//! server-side request forgery surface this service does not need. Embeddings are unit length
//! by default, as OpenAI's are (`"normalize": false` for the raw ones); `pooling` and `layer`
//! are accepted as extra fields (the SDKs' `extra_body`). `dimensions` must be the model's
//! own: CRATE-MAE's embeddings are not trained to be truncated.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use axum::routing::{get, post};
use base64::Engine as _;
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{json, Value};

use super::rest::decode_base64;
use super::{expect_json, Guard, Http, Refusal};
use crate::engine::{EmbedRequest, ImageInput};
use crate::error::ServeError;

const PROTOCOL: &str = "openai";

pub fn routes() -> axum::Router<Arc<Http>> {
    axum::Router::new()
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
}

/// OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`.
fn error_body(refusal: &Refusal) -> Value {
    let status = refusal.status();
    let (kind, code) = match status {
        StatusCode::UNAUTHORIZED => ("authentication_error", Value::Null),
        StatusCode::NOT_FOUND => ("invalid_request_error", json!("model_not_found")),
        StatusCode::TOO_MANY_REQUESTS => ("rate_limit_error", json!("rate_limit_exceeded")),
        s if s.is_client_error() => ("invalid_request_error", Value::Null),
        _ => ("server_error", Value::Null),
    };
    json!({"error": {"message": refusal.message(), "type": kind, "param": Value::Null, "code": code}})
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EmbeddingsRequest {
    model: String,
    input: Value,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<u64>,
    /// Accepted for compatibility; not used.
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
    #[serde(default)]
    pooling: Option<String>,
    #[serde(default)]
    normalize: Option<bool>,
    #[serde(default)]
    layer: Option<u32>,
}

/// One image of `input`: a data URI or base64; a URL or text is refused with the reason.
fn image(i: usize, v: &Value) -> Result<ImageInput, Refusal> {
    let Some(s) = v.as_str() else {
        return Err(Refusal::bad_request(format!(
            "input[{i}]: token arrays are not supported: this model embeds images; send each image as a data URI (data:image/png;base64,...) or base64"
        )));
    };
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Err(Refusal::bad_request(format!(
            "input[{i}]: image URLs are not fetched (the server makes no outbound requests); send the image as a data URI or base64"
        )));
    }
    decode_base64(s).map(ImageInput::Encoded).map_err(|why| {
        Refusal::bad_request(format!(
            "input[{i}]: {why}; text is not supported: this model embeds images sent as data URIs or base64"
        ))
    })
}

async fn embeddings(State(http): State<Arc<Http>>, headers: HeaderMap, body: Body) -> Response {
    let on = (PROTOCOL, "Embeddings");
    let (state, sent) = (&http, &headers);
    http.observe(on, Guard::Model, &headers, error_body, |call| async move {
        let (http, headers) = (state, sent);
        expect_json(headers)?;
        let body = http.body(headers, body).await?;
        let req: EmbeddingsRequest = serde_json::from_slice(&body)
            .map_err(|e| Refusal::bad_request(format!("the request is not valid embeddings JSON: {e}")))?;
        let info = http.engine.info()?;
        if req.model != info.name {
            return Err(ServeError::NotFound(format!(
                "the model `{}` does not exist here; this server embeds with `{}`",
                req.model, info.name
            ))
            .into());
        }
        let pooling = req
            .pooling
            .as_deref()
            .map(|p| p.parse::<crate_mae::Pooling>())
            .transpose()
            .map_err(|e| Refusal::bad_request(format!("`pooling`: {e}")))?;
        let facts = &info.facts;
        let dim = facts.embedding_dim(pooling.unwrap_or(facts.recommended_pooling));
        if let Some(d) = req.dimensions.filter(|&d| d != dim as u64) {
            return Err(Refusal::bad_request(format!(
                "`dimensions` {d} is not offered: this model's embeddings have {dim} dimensions and are not trained to be truncated; omit `dimensions` or send {dim}"
            )));
        }
        let as_base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(Refusal::bad_request(format!(
                    "`encoding_format` must be \"float\" or \"base64\", got {other:?}"
                )))
            }
        };
        let images = match &req.input {
            Value::Array(items) if items.is_empty() => {
                return Err(Refusal::bad_request("`input` is empty: send at least one image"))
            }
            Value::Array(items) if items.iter().all(Value::is_number) => {
                return Err(Refusal::bad_request(
                    "`input` is a token array: this model embeds images; send data URIs or base64",
                ))
            }
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| image(i, v))
                .collect::<Result<Vec<_>, _>>()?,
            one => vec![image(0, one)?],
        };
        let count = images.len();
        let result = http
            .engine
            .embed(
                EmbedRequest {
                    images,
                    pooling,
                    layer: req.layer,
                    normalize: req.normalize.unwrap_or(true),
                    ..Default::default()
                },
                call,
            )
            .await?;
        let data: Vec<Value> = result
            .embeddings
            .iter()
            .enumerate()
            .map(|(index, e)| {
                let embedding = if as_base64 {
                    let bytes: Vec<u8> = e.values.iter().flat_map(|v| v.to_le_bytes()).collect();
                    json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    json!(e.values)
                };
                json!({"object": "embedding", "index": index, "embedding": embedding})
            })
            .collect();
        // A token is one patch or the cls token: what the encoder read.
        let tokens = count * (info.config().num_patches() + 1);
        Ok(super::json(
            StatusCode::OK,
            &json!({
                "object": "list",
                "data": data,
                "model": info.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }),
        ))
    })
    .await
}

async fn models(State(http): State<Arc<Http>>, headers: HeaderMap) -> Response {
    let on = (PROTOCOL, "Models");
    http.observe(on, Guard::Ops, &headers, error_body, |_| async {
        let info = http.engine.info()?;
        Ok(super::json(
            StatusCode::OK,
            &json!({"object": "list", "data": [
                {"id": info.name, "object": "model", "created": 0, "owned_by": "crate-mae-serve"}
            ]}),
        ))
    })
    .await
}
