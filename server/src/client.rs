//! What the bundled clients (`crate-mae-cli`, `crate-mae-load`) share: the endpoint, the
//! bearer-token metadata, and a response size limit large enough for patch tokens.

use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Channel, Endpoint};

use crate::pb::crate_mae_client::CrateMaeClient;

/// Largest response the clients accept (embeddings with patch tokens can be large).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// An endpoint for `addr` (`http://host:port`).
pub fn endpoint(addr: &str, connect_timeout: Duration) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(addr.to_string())
        .map_err(|e| anyhow::anyhow!("invalid --addr {addr:?}: {e}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true))
}

/// `authorization: Bearer <token>` as gRPC metadata, if a token is given.
pub fn bearer(token: Option<&str>) -> anyhow::Result<Option<MetadataValue<Ascii>>> {
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
