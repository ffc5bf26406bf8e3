//! TLS, mutual TLS and the bearer token.

use crate::support::*;

const TOKEN: &str = "test-token-0123456789abcdef";

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bearer_token_guards_the_model_service_but_not_probes() {
    // `ready` polls health without a token: probes stay open by default.
    let (server, mut client) = Server::ready(&[], &[("CRATE_MAE_AUTH_TOKEN", TOKEN)]).await;
    let image = || embed_request(vec![encoded(png(1))]);
    let missing = client.embed(image()).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(
        missing.message().contains("authorization"),
        "{}",
        missing.message()
    );
    let wrong = client
        .embed(with_token(image(), "test-token-0123456789abcdeX"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert!(wrong.message().contains("invalid"));
    let ok = client
        .embed(with_token(image(), TOKEN))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.embeddings.len(), 1);
    assert_eq!(
        metric(&server.scrape().await, "cratemae_auth_failures_total"),
        Some(2.0)
    );

    // Guarding probes too is opt-in.
    let strict = Server::start(
        &["--auth-health-and-reflection"],
        &[("CRATE_MAE_AUTH_TOKEN", TOKEN)],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match strict.health("").await {
            Err(s) if s.code() == Code::Unauthenticated => break,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            other => panic!("health without a token should be UNAUTHENTICATED, got {other:?}"),
        }
    }
}

struct Pki {
    dir: std::path::PathBuf,
    ca: String,
    client_cert: String,
    client_key: String,
}

/// A throwaway CA, a server certificate for localhost/127.0.0.1 and a client certificate.
fn make_pki() -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "crate-mae test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        (
            params.signed_by(&key, &issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let (server_cert, server_key) = leaf(
        vec!["localhost".into(), "127.0.0.1".into()],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(
        vec![],
        "crate-mae test client",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let dir = std::env::temp_dir().join(format!(
        "crate-mae-pki-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server_cert).unwrap();
    std::fs::write(dir.join("server.key"), server_key).unwrap();
    Pki {
        dir,
        ca: ca_cert.pem(),
        client_cert,
        client_key,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_needs_a_client_certificate_from_the_ca() {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let pki = make_pki();
    let path = |f: &str| pki.dir.join(f).display().to_string();
    let (cert, key, ca) = (path("server.pem"), path("server.key"), path("ca.pem"));
    let trust = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    let with_identity = trust
        .clone()
        .identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    // Server-side TLS only: any client that trusts the CA gets in.
    {
        let (_tls_only, mut client) = Server::ready_tls(
            &["--tls-cert", &cert, "--tls-key", &key],
            &[],
            Some(trust.clone()),
        )
        .await;
        let r = client
            .embed(embed_request(vec![encoded(png(2))]))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.embeddings.len(),
            1,
            "TLS without client certificates works"
        );
    }
    let (server, mut client) = Server::ready_tls(
        &[
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
        ],
        &[],
        Some(with_identity),
    )
    .await;
    let r = client
        .embed(embed_request(vec![encoded(png(2))]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.embeddings.len(),
        1,
        "TLS handshake with a client certificate works"
    );

    // No client certificate: the handshake (or the first call) is refused.
    let refused = match server.endpoint(Some(trust)).connect().await {
        Err(_) => true,
        Ok(channel) => CrateMaeClient::new(channel)
            .embed(embed_request(vec![encoded(png(2))]))
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate got through");
    // Plaintext against the TLS port fails too.
    let plain = match server.endpoint(None).connect().await {
        Err(_) => true,
        Ok(channel) => CrateMaeClient::new(channel)
            .embed(embed_request(vec![encoded(png(2))]))
            .await
            .is_err(),
    };
    assert!(plain, "plaintext got through a TLS-only port");
    let _ = std::fs::remove_dir_all(&pki.dir);
}
