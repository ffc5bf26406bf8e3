//! What the bundled clients (`crate-mae-cli`, `crate-mae-load`) share: the server flags, the
//! endpoint, the bearer-token metadata, and a response size limit large enough for patch
//! tokens.

use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::pb::crate_mae_client::CrateMaeClient;

/// Where the server is and how to authenticate: the flags both clients take.
#[derive(clap::Args, Debug, Clone)]
pub struct ServerArgs {
    /// Server address.
    #[arg(long, env = "CRATE_MAE_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Bearer token, sent as `authorization: Bearer <token>`.
    #[arg(long, env = "CRATE_MAE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ServerArgs {
    pub fn endpoint(&self, connect_timeout: Duration) -> anyhow::Result<Endpoint> {
        endpoint(&self.addr, connect_timeout)
    }

    pub fn bearer(&self) -> anyhow::Result<Option<MetadataValue<Ascii>>> {
        bearer(self.token.as_deref())
    }
}

/// `value` seconds as a duration, or an error naming the flag `name`.
pub fn positive_seconds(name: &str, value: f64) -> anyhow::Result<Duration> {
    if value.is_finite() && value > 0.0 {
        Ok(Duration::from_secs_f64(value))
    } else {
        anyhow::bail!("{name} must be a positive number of seconds, got {value}")
    }
}

/// Largest response the clients accept (embeddings with patch tokens can be large).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// An endpoint for `addr` (`http://host:port`).
fn endpoint(addr: &str, connect_timeout: Duration) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(addr.to_string())
        .map_err(|e| anyhow::anyhow!("invalid --addr {addr:?}: {e}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true))
}

/// `authorization: Bearer <token>` as gRPC metadata, if a token is given.
fn bearer(token: Option<&str>) -> anyhow::Result<Option<MetadataValue<Ascii>>> {
    token
        .map(|t| {
            format!("Bearer {t}")
                .parse::<MetadataValue<Ascii>>()
                .map_err(|_| {
                    anyhow::anyhow!("--token contains characters not allowed in gRPC metadata")
                })
        })
        .transpose()
}

/// A CrateMae client on `channel` with the large response limit.
pub fn crate_mae(channel: Channel) -> CrateMaeClient<Channel> {
    CrateMaeClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES)
}

/// The canonical gRPC name of a status code (`RESOURCE_EXHAUSTED`, ...).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
