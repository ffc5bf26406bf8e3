//! Request parameters, in either wire form: which names a model takes, the reserved ones the
//! protocol's clients attach, and each value read into what the engine takes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::engine::{self, Call, MaskSpec};
use crate::error::ServeError;

use super::models::Served;

/// One parameter value, as either wire form carries it (gRPC's `InferParameter`, or a JSON
/// scalar).
#[derive(Debug, Clone, PartialEq)]
pub enum Param {
    Bool(bool),
    Int(i64),
    Uint(u64),
    Double(f64),
    Str(String),
}

pub type Params = HashMap<String, Param>;

/// The reserved parameters this server acts on ([`with_call_parameters`]), also listed in
/// the model configuration.
pub const HONOURED_PARAMETERS: &[&str] = &["timeout", "priority"];

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

pub fn check(params: &Params, served: Served) -> Result<(), ServeError> {
    let known = served.parameters();
    for name in params.keys() {
        let name = name.as_str();
        let reserved = HONOURED_PARAMETERS.contains(&name)
            || STANDARD_PARAMETERS.contains(&name)
            || name.starts_with("triton_");
        if !known.contains(&name) && !reserved {
            return Err(ServeError::invalid(format!(
                "unknown parameter `{name}`; this model takes {known:?}"
            )));
        }
    }
    Ok(())
}

pub fn integer(params: &Params, name: &str) -> Result<Option<i64>, ServeError> {
    match params.get(name) {
        None => Ok(None),
        Some(Param::Int(v)) => Ok(Some(*v)),
        Some(Param::Uint(v)) => i64::try_from(*v)
            .map(Some)
            .map_err(|_| ServeError::invalid(format!("parameter `{name}` is too large"))),
        Some(other) => Err(ServeError::invalid(format!(
            "parameter `{name}` must be an integer, got {other:?}"
        ))),
    }
}

pub fn boolean(params: &Params, name: &str) -> Result<Option<bool>, ServeError> {
    match params.get(name) {
        None => Ok(None),
        Some(Param::Bool(v)) => Ok(Some(*v)),
        Some(other) => Err(ServeError::invalid(format!(
            "parameter `{name}` must be a bool, got {other:?}"
        ))),
    }
}

/// Embedding options: `pooling` ("cls" | "mean" | "whitened-grid"; unset: the model's recommendation),
/// `normalize`, `layer`.
pub struct EmbedOptions {
    pub pooling: Option<crate_mae::Pooling>,
    pub normalize: bool,
    pub layer: Option<u32>,
}

pub fn embed_options(params: &Params) -> Result<EmbedOptions, ServeError> {
    let pooling = match params.get("pooling") {
        None => None,
        Some(Param::Str(p)) => Some(
            p.parse::<crate_mae::Pooling>()
                .map_err(|e| ServeError::invalid(format!("parameter `pooling`: {e}")))?,
        ),
        Some(other) => {
            return Err(ServeError::invalid(format!(
                "parameter `pooling` must be a string (\"cls\", \"mean\" or \"whitened-grid\"), got {other:?}"
            )))
        }
    };
    let layer = integer(params, "layer")?
        .map(|l| {
            u32::try_from(l)
                .map_err(|_| ServeError::invalid(format!("parameter `layer` must be ≥ 0, got {l}")))
        })
        .transpose()?;
    Ok(EmbedOptions {
        pooling,
        normalize: boolean(params, "normalize")?.unwrap_or(false),
        layer,
    })
}

/// Image `index`'s mask: `mask_ratio` (a double, or a decimal string, as the `kserve` SDK's
/// gRPC parameters have no doubles) and `seed`, drawn as every protocol draws masks.
pub fn mask(params: &Params, index: usize) -> Result<MaskSpec, ServeError> {
    let ratio = match params.get("mask_ratio") {
        None => None,
        Some(Param::Double(r)) => Some(*r as f32),
        Some(Param::Str(r)) => Some(r.trim().parse::<f32>().map_err(|_| {
            ServeError::invalid(format!("parameter `mask_ratio`: `{r}` is not a number"))
        })?),
        Some(other) => {
            return Err(ServeError::invalid(format!(
                "parameter `mask_ratio` must be a double or a decimal string, got {other:?}"
            )))
        }
    };
    let seed = integer(params, "seed")?.unwrap_or(0) as u64;
    Ok(MaskSpec::random_in_request(ratio, seed, index))
}

/// Triton's `timeout` request parameter (microseconds) as a deadline, the earlier of it and
/// the call's own deadline applying; and its `priority` as the model configuration lists the
/// levels (0 or 1: online, the default; 2: bulk, as a stream's work is treated).
pub fn with_call_parameters(params: &Params, mut call: Call) -> Result<Call, ServeError> {
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
