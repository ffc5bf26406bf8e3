//! KServe's Open Inference Protocol v2, in both its forms: gRPC (`inference.GRPCInferenceService`,
//! [`grpc`]) and REST (`/v2/...`, in [`crate::transport::http`]), so the server can join fleets
//! served through KServe or Triton-style tooling and answer `tritonclient` and the `kserve`
//! SDK. Same engine, same queues and admission as `cratemae.v1`. What the two forms share:
//! [`models`] (what is served, metadata, configuration, statistics), [`params`] (request
//! parameters) and [`infer`] (inputs → engine → outputs).
//!
//! Two models: `<name>` (embeddings) and `<name>-complete` (masked completion). Inputs are
//! either `image`, BYTES `[B]` of PNG/JPEG files, or `pixels`, FP32 `[B, 3, S, S]` normalised
//! pixels, as `raw_input_contents` or typed `contents` (not both); `image` may also be shaped
//! `[B, 1]`, as Triton's tools send a batched one-element input. Both inputs are `optional` in
//! the model configuration: a request sends exactly one. gRPC outputs are always sent as
//! `raw_output_contents` (what `tritonclient`'s `as_numpy` reads); with no `outputs` listed,
//! every output the metadata lists, as the protocol says. `patch_tokens` (`[B, L, D]`, 150×
//! the size of an embedding) is not listed: it is returned only when named in `outputs`, so
//! clients and benchmarks that ask for every listed output measure embeddings. Request
//! parameters: `pooling` ("cls" | "mean" | "whitened-grid"), `normalize`, `layer`; `mask_ratio` (a double, or a
//! string such as "0.5": the `kserve` SDK cannot send doubles) and `seed` for completion;
//! Triton's `timeout` (microseconds) is a deadline like `grpc-timeout`, the earlier wins, and
//! its `priority` picks the level the configuration lists (1 online, 2 bulk).
//! Where the protocol leaves room, this follows Triton: an unknown model is NOT_FOUND,
//! ModelReady included. Triton's ModelConfig and ModelStatistics extensions are answered too.

pub mod grpc;
pub mod infer;
pub mod models;
pub mod params;

pub use grpc::InferenceService;
