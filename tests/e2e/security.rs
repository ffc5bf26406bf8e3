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
    // The same token on the HTTP model routes; HTTP probes stay open too.
    let body = serde_json::to_vec(&serde_json::json!({
        "model": "crate-mae",
        "input": format!("data:image/png;base64,{}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, png(1))),
    }))
    .unwrap();
    let json = ("Content-Type", "application/json");
    let refused = http_call(server.http, "POST", "/v1/embeddings", &[json], &body).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("www-authenticate"), Some("Bearer"));
    assert!(refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("authorization"));
    let bearer = format!("Bearer {TOKEN}");
    let allowed = http_call(
        server.http,
        "POST",
        "/v1/embeddings",
        &[json, ("Authorization", &bearer)],
        &body,
    )
    .await;
    assert_eq!(
        allowed.status,
        200,
        "{}",
        String::from_utf8_lossy(&allowed.body)
    );
    let probe = http_call(server.http, "GET", "/v2/health/ready", &[], b"").await;
    assert_eq!(probe.status, 200, "HTTP probes need no token");
    assert_eq!(
        metric(&server.scrape().await, "cratemae_auth_failures_total"),
        Some(3.0)
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

    // The HTTP listener has the same TLS: curl with the client certificate gets in, curl
    // without it does not, nor does plaintext.
    std::fs::write(pki.dir.join("client.pem"), &pki.client_cert).unwrap();
    std::fs::write(pki.dir.join("client.key"), &pki.client_key).unwrap();
    let url = format!("https://localhost:{}/v2/health/ready", server.http.port());
    let with_cert = curl_status(
        &ca,
        &[
            "--cert",
            &path("client.pem"),
            "--key",
            &path("client.key"),
            &url,
        ],
    )
    .await;
    assert_eq!(with_cert, "200", "HTTPS with a client certificate");
    let without = curl_status(&ca, &[&url]).await;
    assert_ne!(without, "200", "HTTPS without a client certificate");
    let plaintext = curl_status(&ca, &[&url.replace("https://", "http://")]).await;
    assert_ne!(plaintext, "200", "plaintext HTTP on a TLS port");
    let _ = std::fs::remove_dir_all(&pki.dir);
}

/// The HTTP status curl got (`000` when it got none), trusting `ca`.
async fn curl_status(ca: &str, args: &[&str]) -> String {
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            ca,
        ])
        .args(args)
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}
