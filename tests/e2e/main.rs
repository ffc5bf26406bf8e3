//! End to end: the real `crate-mae-server` binary on a loopback port, driven by a real tonic
//! client. Fixtures (PNG, JPEG) are generated here or committed under `tests/fixtures`;
//! nothing comes from the network. One test binary, one module per area.

mod api;
mod default_model;
mod hardening;
mod http;
mod http2;
mod ops;
mod python;
mod security;
mod support;
mod tracing;
