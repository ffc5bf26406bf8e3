//! The two served models as the protocol describes them: their inputs, outputs and
//! parameters, written down once and read by metadata, the model configuration and
//! statistics (both wire forms).

use crate::engine::{Engine, Kind, ModelInfo, Totals};
use crate::error::ServeError;
use crate::oip_pb as pb;
use crate::oip_pb::model_metadata_response::TensorMetadata;

use super::params::HONOURED_PARAMETERS;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Embed,
    Complete,
}

impl Served {
    pub fn kind(self) -> Kind {
        match self {
            Served::Embed => Kind::Embed,
            Served::Complete => Kind::Complete,
        }
    }

    /// The outputs the metadata lists: sent when a request names none.
    pub fn outputs(self) -> &'static [&'static str] {
        match self {
            Served::Embed => &["embedding"],
            Served::Complete => &["reconstruction", "composite", "mask", "masked_patch_mse"],
        }
    }

    /// The request parameters of this model's own (beside the protocol's reserved ones).
    pub fn parameters(self) -> &'static [&'static str] {
        match self {
            Served::Embed => &["pooling", "normalize", "layer"],
            Served::Complete => &["mask_ratio", "seed"],
        }
    }

    /// Outputs sent only when named.
    pub fn on_request(self) -> &'static [&'static str] {
        match self {
            Served::Embed => &["patch_tokens"],
            Served::Complete => &[],
        }
    }
}

/// The one place each served model's input, output and parameter shapes are written down;
/// the metadata and the model configuration are both read off it.
pub struct Tensor {
    pub name: &'static str,
    pub datatype: &'static str,
    /// Without the batch dimension.
    pub dims: Vec<i64>,
}

pub fn inputs(info: &ModelInfo) -> [Tensor; 2] {
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

pub fn outputs(info: &ModelInfo, served: Served) -> Vec<Tensor> {
    let c = info.config();
    let (d, l) = (c.dim as i64, c.num_patches() as i64);
    // With a whitened grid the width depends on the pooling a request names (-1: variable).
    let embedding = if info.facts.whitened_grid.is_some() {
        -1
    } else {
        d
    };
    served
        .outputs()
        .iter()
        .map(|&name| {
            let (datatype, dims) = match name {
                "embedding" => ("FP32", vec![embedding]),
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

pub fn completion_name(info: &ModelInfo) -> String {
    format!("{}-complete", info.name)
}

/// Which model a name and version address.
pub fn resolve(info: &ModelInfo, name: &str, version: &str) -> Result<Served, ServeError> {
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

pub fn model_name(info: &ModelInfo, served: Served) -> String {
    match served {
        Served::Embed => info.name.clone(),
        Served::Complete => completion_name(info),
    }
}

pub const PLATFORM: &str = "crate-mae-serve/candle";

/// The server's name in ServerMetadata.
pub const SERVER_NAME: &str = "crate-mae-serve";

/// Triton's names for the extensions answered here (both wire forms); perf_analyzer reads
/// server-side statistics only when `statistics` is listed.
pub const EXTENSIONS: &[&str] = &["model_configuration", "statistics"];

/// Triton's tools parse model versions as integers (perf_analyzer aborts on any other), so
/// statistics report the served model as version `1`, which every rpc also accepts as an
/// alias of the weights' SHA-256 that metadata and responses carry.
pub const TRITON_VERSION: &str = "1";

pub fn metadata(info: &ModelInfo, served: Served) -> pb::ModelMetadataResponse {
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
pub fn model_config(info: &ModelInfo, served: Served) -> pb::ModelConfig {
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
            // What computes it and how it fits small images, as GetModelInfo says.
            .chain(
                [
                    ("kernel", info.facts.kernel.clone()),
                    ("dtype", info.facts.precision.name().to_string()),
                    (
                        "small_image_fit",
                        info.facts.small_image_fit.name().to_string(),
                    ),
                ]
                .map(|(k, v)| (k.to_string(), pb::ModelParameter { string_value: v })),
            )
            .collect(),
    }
}

fn duration(t: Totals) -> Option<pb::StatisticDuration> {
    Some(pb::StatisticDuration {
        count: t.count,
        ns: t.ns,
    })
}

pub fn model_statistics(engine: &Engine, info: &ModelInfo, served: Served) -> pb::ModelStatistics {
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

/// The statistics a ModelStatistics call asks for: as Triton, no name means every model, and a
/// version without a name is refused.
pub fn statistics_of(
    engine: &Engine,
    name: &str,
    version: &str,
) -> Result<Vec<pb::ModelStatistics>, ServeError> {
    let info = engine.info()?;
    let served = if name.is_empty() {
        if !version.is_empty() {
            return Err(ServeError::invalid(
                "a model version was given without a model name",
            ));
        }
        vec![Served::Embed, Served::Complete]
    } else {
        vec![resolve(info, name, version)?]
    };
    Ok(served
        .into_iter()
        .map(|s| model_statistics(engine, info, s))
        .collect())
}
