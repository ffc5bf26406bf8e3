//! Who may call: optional TLS / mutual TLS (rustls) and an optional bearer token.
//!
//! Secrets come from files or the environment, are held as [`Secret`] (redacted in every
//! `Debug`), and are never logged. Tokens are compared in constant time, on their SHA-256
//! digests so that neither content nor length leaks through timing.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// A value that must not appear in logs.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read {what} {}: {e}", path.display()))
}

/// The bearer token, from the environment/flag or a file (trimmed); at most one source.
pub fn load_token(
    inline: Option<&Secret>,
    file: Option<&PathBuf>,
) -> anyhow::Result<Option<Secret>> {
    let token = match (inline, file) {
        (Some(_), Some(_)) => anyhow::bail!(
            "give the auth token either inline (CRATE_MAE_AUTH_TOKEN) or as a file, not both"
        ),
        (Some(t), None) => t.expose().trim().to_string(),
        (None, Some(path)) => String::from_utf8(read(path, "auth token file")?)
            .map_err(|_| anyhow::anyhow!("auth token file {} is not UTF-8", path.display()))?
            .trim()
            .to_string(),
        (None, None) => return Ok(None),
    };
    anyhow::ensure!(
        token.len() >= 16,
        "the auth token must be at least 16 characters"
    );
    Ok(Some(Secret(token)))
}

/// TLS from PEM files: server certificate chain and key, and optionally a CA whose client
/// certificates are required (mutual TLS).
pub fn tls_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<ServerTlsConfig> {
    let identity = Identity::from_pem(read(cert, "TLS certificate")?, read(key, "TLS key")?);
    let mut config = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = client_ca {
        config = config.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
    }
    Ok(config)
}

/// The same TLS (and mutual TLS) as [`tls_config`], for the HTTP listener: rustls with the
/// ring provider, ALPN `h2` and `http/1.1`.
pub fn rustls_server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> anyhow::Result<Arc<tokio_rustls::rustls::ServerConfig>> {
    use tokio_rustls::rustls::{self, pki_types::pem::PemObject, pki_types::CertificateDer};
    let certs = CertificateDer::pem_slice_iter(&read(cert, "TLS certificate")?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("TLS certificate {}: {e}", cert.display()))?;
    let key_der = rustls::pki_types::PrivateKeyDer::from_pem_slice(&read(key, "TLS key")?)
        .map_err(|e| anyhow::anyhow!("TLS key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&read(ca, "client CA")?) {
                roots.add(c.map_err(|e| anyhow::anyhow!("client CA {}: {e}", ca.display()))?)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key_der)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Checks `authorization: Bearer <token>` when a token is configured.
#[derive(Clone, Default)]
pub struct BearerAuth {
    digest: Option<Arc<[u8; 32]>>,
}

impl BearerAuth {
    pub fn new(token: Option<&Secret>) -> Self {
        Self {
            digest: token.map(|t| Arc::new(Sha256::digest(t.expose().as_bytes()).into())),
        }
    }

    pub fn enabled(&self) -> bool {
        self.digest.is_some()
    }
}

impl BearerAuth {
    /// Checks an `authorization` value (gRPC metadata or an HTTP header); a refusal is
    /// counted and says what was wrong, never what was expected.
    pub fn check(&self, authorization: Option<&[u8]>) -> Result<(), &'static str> {
        let Some(expected) = &self.digest else {
            return Ok(());
        };
        let refuse = |why| {
            crate::telemetry::auth_failure();
            Err(why)
        };
        let Some(header) = authorization else {
            return refuse("missing `authorization: Bearer <token>`");
        };
        let Some(presented) = header.strip_prefix(b"Bearer ") else {
            return refuse("`authorization` must be `Bearer <token>`");
        };
        let presented: [u8; 32] = Sha256::digest(presented).into();
        if bool::from(presented.ct_eq(expected.as_ref())) {
            Ok(())
        } else {
            refuse("invalid bearer token")
        }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let header = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        match self.check(header) {
            Ok(()) => Ok(request),
            Err(why) => Err(Status::unauthenticated(why)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn with_header(value: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(v) = value {
            r.metadata_mut().insert("authorization", v.parse().unwrap());
        }
        r
    }

    #[test]
    fn tokens_are_checked_and_never_printed() {
        let secret = Secret::new("correct-horse-battery-staple");
        assert!(!format!("{secret:?}").contains("horse"));
        let mut auth = BearerAuth::new(Some(&secret));
        assert!(auth
            .call(with_header(Some("Bearer correct-horse-battery-staple")))
            .is_ok());
        for bad in [
            None,
            Some("Bearer wrong"),
            Some("correct-horse-battery-staple"),
            Some("Bearer correct-horse-battery-stapl"),
        ] {
            let status = auth.call(with_header(bad)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        assert!(BearerAuth::new(None).call(with_header(None)).is_ok());
    }

    #[test]
    fn short_or_doubly_given_tokens_are_refused() {
        assert!(load_token(Some(&Secret::new("short")), None).is_err());
        let file = tempfile::NamedTempFile::new().unwrap();
        let path = file.path().to_path_buf();
        std::fs::write(&path, "from-a-file-0123456789\n").unwrap();
        assert_eq!(
            load_token(None, Some(&path)).unwrap().unwrap().expose(),
            "from-a-file-0123456789"
        );
        assert!(load_token(Some(&Secret::new("x".repeat(20))), Some(&path)).is_err());
    }
}
