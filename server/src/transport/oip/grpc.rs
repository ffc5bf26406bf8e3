//! The protocol's gRPC form (`inference.GRPCInferenceService`): each rpc is a few lines
//! around the shared models and ModelInfer, plus the mapping between its messages and the
//! shared request and response.

use std::collections::HashMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::engine::{Engine, State};
use crate::error::ServeError;
use crate::oip_pb as pb;
use crate::oip_pb::infer_parameter::ParameterChoice;
use crate::oip_pb::model_infer_response::InferOutputTensor;
use crate::transport::observe;

use super::infer::{infer, Data, InferRequest, InferResponse, Input, RequestedOutput};
use super::models::{metadata, model_config, resolve, statistics_of, EXTENSIONS, SERVER_NAME};
use super::params::{Param, Params};

pub const PROTOCOL: &str = "oip.v2";

#[derive(Clone)]
pub struct InferenceService {
    engine: Arc<Engine>,
}

impl InferenceService {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

fn params(wire: HashMap<String, pb::InferParameter>) -> Params {
    wire.into_iter()
        .filter_map(|(name, p)| {
            let value = match p.parameter_choice? {
                ParameterChoice::BoolParam(v) => Param::Bool(v),
                ParameterChoice::Int64Param(v) => Param::Int(v),
                ParameterChoice::Uint64Param(v) => Param::Uint(v),
                ParameterChoice::DoubleParam(v) => Param::Double(v),
                ParameterChoice::StringParam(v) => Param::Str(v),
            };
            Some((name, value))
        })
        .collect()
}

/// The message as the shared request: `raw_input_contents` (one per input, in order) or
/// typed contents, never both.
fn from_wire(mut req: pb::ModelInferRequest) -> Result<InferRequest, ServeError> {
    let mut raw = std::mem::take(&mut req.raw_input_contents).into_iter();
    if raw.len() > 0 && raw.len() != req.inputs.len() {
        return Err(ServeError::invalid(format!(
            "{} raw_input_contents for {} input(s)",
            raw.len(),
            req.inputs.len()
        )));
    }
    let inputs = req
        .inputs
        .into_iter()
        .map(|input| {
            let contents = input.contents.unwrap_or_default();
            let typed = if !contents.bytes_contents.is_empty() {
                Data::Bytes(contents.bytes_contents)
            } else if !contents.fp32_contents.is_empty() {
                Data::Fp32(contents.fp32_contents)
            } else {
                Data::Empty
            };
            let data = match (raw.next(), typed) {
                (Some(_), Data::Bytes(_) | Data::Fp32(_)) => {
                    return Err(ServeError::invalid(format!(
                        "input `{}` has both raw_input_contents and typed contents: send one",
                        input.name
                    )))
                }
                (Some(raw), _) => Data::Raw(raw),
                (None, typed) => typed,
            };
            Ok(Input {
                shared_memory: input
                    .parameters
                    .keys()
                    .any(|k| k.starts_with("shared_memory")),
                name: input.name,
                datatype: input.datatype,
                shape: input.shape,
                data,
            })
        })
        .collect::<Result<_, ServeError>>()?;
    Ok(InferRequest {
        model_name: req.model_name,
        model_version: req.model_version,
        id: req.id,
        parameters: params(req.parameters),
        inputs,
        outputs: req
            .outputs
            .into_iter()
            .map(|o| RequestedOutput {
                classification: o.parameters.contains_key("classification"),
                name: o.name,
            })
            .collect(),
    })
}

/// Outputs always as `raw_output_contents` (what `tritonclient`'s `as_numpy` reads).
fn to_wire(response: InferResponse) -> pb::ModelInferResponse {
    let (outputs, raw) = response
        .outputs
        .into_iter()
        .map(|o| {
            let tensor = InferOutputTensor {
                name: o.name,
                datatype: o.datatype.into(),
                shape: o.shape,
                ..Default::default()
            };
            (tensor, o.raw)
        })
        .unzip();
    pb::ModelInferResponse {
        model_name: response.model_name,
        model_version: response.model_version,
        id: response.id,
        parameters: HashMap::new(),
        outputs,
        raw_output_contents: raw,
    }
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
                    name: SERVER_NAME.into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    extensions: EXTENSIONS.iter().map(|e| e.to_string()).collect(),
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
        observe(
            engine,
            PROTOCOL,
            "ModelInfer",
            request,
            |req, call| async move {
                let response = infer(engine, from_wire(req)?, call).await?;
                Ok(to_wire(response))
            },
        )
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
                Ok(pb::ModelStatisticsResponse {
                    model_stats: statistics_of(engine, &req.name, &req.version)?,
                })
            },
        )
        .await
    }
}
