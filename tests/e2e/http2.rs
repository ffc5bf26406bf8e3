//! What clients and networks do at the HTTP/2 level: deadlines that expire at every stage
//! (answered DEADLINE_EXCEEDED by the server, never CANCELLED), connections that open streams
//! and never finish them, more connections than the cap, and compressed messages.

use bytes::Bytes;
use prost::Message;
use tokio::net::TcpStream;

use crate::support::*;
use crate_mae_server::oip_pb::model_infer_request::InferInputTensor;
use crate_mae_server::oip_pb::ModelInferRequest;

const EMBED: &str = "/cratemae.v1.CrateMae/Embed";

/// The fixture PNGs (Fashion-MNIST test images, one per class).
fn fixtures() -> Vec<Vec<u8>> {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fashion-mnist");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// A bare HTTP/2 connection: no client-side deadline timer, so every status is the server's.
/// Aborting the returned task closes the connection.
async fn h2_connect(addr: &str) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (sender, connection) = h2::client::handshake(tcp).await.unwrap();
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    (sender, task)
}

/// One unary gRPC call with `grpc-timeout: timeout`; returns grpc-status and grpc-message.
async fn raw_call(
    sender: h2::client::SendRequest<Bytes>,
    authority: String,
    path: &'static str,
    message: Vec<u8>,
    timeout: &'static str,
) -> (i32, String) {
    let request = http::Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(())
        .unwrap();
    let mut sender = sender.ready().await.unwrap();
    let (response, mut body) = sender.send_request(request, false).unwrap();
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(&message);
    body.send_data(Bytes::from(framed), true).unwrap();
    let (parts, mut stream) = response.await.unwrap().into_parts();
    let status = |h: &http::HeaderMap| {
        let code = h.get("grpc-status")?.to_str().ok()?.parse().ok()?;
        let message = h
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .unwrap_or("")
            .to_string();
        Some((code, message))
    };
    if let Some(s) = status(&parts.headers) {
        return s; // trailers-only: an error
    }
    while let Some(chunk) = stream.data().await {
        let chunk = chunk.unwrap();
        let _ = stream.flow_control().release_capacity(chunk.len());
    }
    let trailers = stream
        .trailers()
        .await
        .unwrap()
        .expect("a gRPC response ends in trailers");
    status(&trailers).expect("grpc-status in the trailers")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_deadlines_are_deadline_exceeded_never_cancelled() {
    let _cores = exclusive().await;
    let (server, _client) = Server::ready_with(Weights::BuiltIn, &[], &[], None).await;
    let authority = server.grpc.trim_start_matches("http://").to_string();
    let pngs: Vec<Vec<u8>> = fixtures().into_iter().take(8).collect();
    let embed = EmbedRequest {
        images: pngs.iter().cloned().map(encoded).collect(),
        ..Default::default()
    }
    .encode_to_vec();
    let mut raw = Vec::new();
    for png in &pngs {
        raw.extend_from_slice(&(png.len() as u32).to_le_bytes());
        raw.extend_from_slice(png);
    }
    let infer = ModelInferRequest {
        model_name: "crate-mae".into(),
        inputs: vec![InferInputTensor {
            name: "image".into(),
            datatype: "BYTES".into(),
            shape: vec![8],
            ..Default::default()
        }],
        raw_input_contents: vec![raw],
        ..Default::default()
    }
    .encode_to_vec();
    // Deadlines from 1 µs to 2 ms: some expire before the handler runs, some in admission,
    // decoding or the queue, some while their batch computes; waves of 12 keep the model busy.
    let timeouts = ["1u", "100u", "300u", "500u", "800u", "1m", "1500u", "2m"];
    let (sender, _connection) = h2_connect(&authority).await;
    let mut codes = std::collections::BTreeMap::<i32, usize>::new();
    let mut messages = std::collections::BTreeSet::new();
    for wave in 0..8 {
        let calls: Vec<_> = (0..12)
            .map(|i| {
                let n = wave * 12 + i;
                let (path, body) = if n % 2 == 0 {
                    (EMBED, embed.clone())
                } else {
                    ("/inference.GRPCInferenceService/ModelInfer", infer.clone())
                };
                let timeout = timeouts[n % timeouts.len()];
                tokio::spawn(raw_call(
                    sender.clone(),
                    authority.clone(),
                    path,
                    body,
                    timeout,
                ))
            })
            .collect();
        for call in calls {
            let (code, message) = call.await.unwrap();
            *codes.entry(code).or_default() += 1;
            if code != 0 {
                messages.insert(format!("{code}: {message}"));
            }
        }
    }
    eprintln!("statuses {codes:?}; messages {messages:?}");
    assert_eq!(
        codes.get(&1),
        None,
        "CANCELLED for an expired deadline: {messages:?}"
    );
    assert!(
        codes.keys().all(|c| [0, 4].contains(c)),
        "only OK and DEADLINE_EXCEEDED expected: {codes:?} {messages:?}"
    );
    let expired = codes.get(&4).copied().unwrap_or(0);
    assert!(
        expired >= 60,
        "{expired} of 96 expired; expected most: {codes:?}"
    );
    // Each expired call is counted once, whichever layer answered it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dropped = metric(
        &server.scrape().await,
        r#"cratemae_dropped_requests_total{reason="deadline"}"#,
    );
    assert_eq!(dropped, Some(expired as f64));
}

/// An HTTP/2 frame: 9-byte header and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The HPACK block of an Embed call's headers: static-table entries and literals without
/// indexing, no Huffman, so every block is the same and independent.
fn embed_headers(authority: &str) -> Vec<u8> {
    let literal = |out: &mut Vec<u8>, value: &str| {
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    };
    let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
    b.push(0x04); // :path, literal value
    literal(&mut b, EMBED);
    b.push(0x01); // :authority
    literal(&mut b, authority);
    b.extend_from_slice(&[0x0f, 0x10]); // content-type (static index 31)
    literal(&mut b, "application/grpc");
    b.push(0x00); // a new name: te
    literal(&mut b, "te");
    literal(&mut b, "trailers");
    b
}

/// One connection that opens `streams` Embed calls and never sends their bodies, ignoring
/// the server's stream limit as an attacker would. Returns once every HEADERS frame is
/// written or the server has closed the connection; the socket stays open until dropped.
async fn flood_open_streams(authority: &str, streams: u32) -> tokio::net::tcp::OwnedWriteHalf {
    let mut tcp = TcpStream::connect(authority).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tcp.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
    // The server's SETTINGS come first; acknowledge them.
    loop {
        let mut header = [0u8; 9];
        tcp.read_exact(&mut header).await.unwrap();
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0; len];
        tcp.read_exact(&mut payload).await.unwrap();
        if header[3] == 0x4 && header[4] & 1 == 0 {
            break;
        }
    }
    tcp.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap();
    let (mut read, mut write) = tcp.into_split();
    // Whatever the server sends back (resets, window updates, GOAWAY) is read and dropped.
    tokio::spawn(async move {
        let mut sink = vec![0u8; 1 << 16];
        while matches!(read.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let block = embed_headers(authority);
    let mut batch = Vec::with_capacity(1 << 17);
    for i in 0..streams {
        batch.extend_from_slice(&frame(0x1, 0x4, 2 * i + 1, &block)); // HEADERS, END_HEADERS
        if batch.len() >= 1 << 16 || i + 1 == streams {
            if write.write_all(&batch).await.is_err() {
                break; // the server closed the connection
            }
            batch.clear();
        }
    }
    write
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_that_never_finish_cannot_exhaust_memory() {
    let _cores = exclusive().await;
    let (server, mut client) = Server::ready_with(Weights::BuiltIn, &[], &[], None).await;
    let pid = server.child.id().unwrap();
    let authority = server.grpc.trim_start_matches("http://").to_string();
    let png = fixtures().swap_remove(0);
    let before = rss_mib(pid);
    let floods: Vec<_> = (0..6)
        .map(|_| {
            let authority = authority.clone();
            tokio::spawn(async move { flood_open_streams(&authority, 20_000).await })
        })
        .collect();
    // A good client is served throughout the flood and after it.
    let mut served = 0;
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let answer = client
            .embed(embed_request(vec![encoded(png.clone())]))
            .await
            .expect("a good client is served during the flood");
        assert_eq!(answer.into_inner().embeddings.len(), 1);
        served += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held: Vec<_> = futures::future::join_all(floods)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let peak = memory_mib(pid, "VmHWM");
    let now = rss_mib(pid);
    eprintln!(
        "6 connections × 20,000 open streams: RSS {before:.0} MiB before, {now:.0} MiB after, peak {peak:.0} MiB; {served} good calls served"
    );
    assert!(
        peak <= 300.0,
        "peak RSS {peak:.0} MiB over the 300 MiB bound"
    );
    assert!(served >= 20, "only {served} good calls in 3 s");
    drop(held);
    client
        .embed(embed_request(vec![encoded(png)]))
        .await
        .expect("served after the flood");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_past_the_cap_are_refused_and_the_slot_returns() {
    let (server, client) = Server::ready(&["--max-connections", "3"], &[]).await;
    let authority = server.grpc.trim_start_matches("http://").to_string();
    // Start from no connection: the readiness probes' and the client's have closed.
    drop(client);
    for _ in 0..100 {
        if metric(&server.scrape().await, "cratemae_connections_open") == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = embed_request(vec![encoded(png(1))]).encode_to_vec();
    let mut open = Vec::new();
    for _ in 0..3 {
        let (sender, connection) = h2_connect(&authority).await;
        let (code, _) = raw_call(
            sender.clone(),
            authority.clone(),
            EMBED,
            body.clone(),
            "10S",
        )
        .await;
        assert_eq!(code, 0);
        open.push((sender, connection)); // the connection lives while its sender does
    }
    let refused = async {
        let tcp = TcpStream::connect(&authority).await.ok()?;
        let (sender, connection) = h2::client::handshake(tcp).await.ok()?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let (code, _) = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::spawn(raw_call(
                sender,
                authority.clone(),
                EMBED,
                body.clone(),
                "10S",
            )),
        )
        .await
        .ok()?
        .ok()?;
        Some(code)
    };
    assert_eq!(
        refused.await,
        None,
        "a fourth connection must be closed on arrival"
    );
    let metrics = server.scrape().await;
    assert!(metric(&metrics, "cratemae_connections_refused_total").unwrap() >= 1.0);
    assert_eq!(metric(&metrics, "cratemae_connections_open"), Some(3.0));
    for (_, connection) in open {
        connection.abort();
    }
    // Slots come back as connections close.
    let mut served = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Ok(tcp) = TcpStream::connect(&authority).await {
            if let Ok((sender, connection)) = h2::client::handshake(tcp).await {
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                let call = raw_call(sender, authority.clone(), EMBED, body.clone(), "10S");
                if let Ok(Ok((0, _))) =
                    tokio::time::timeout(Duration::from_secs(5), tokio::spawn(call)).await
                {
                    served = true;
                    break;
                }
            }
        }
    }
    assert!(served, "a new connection is served once the others closed");
}

#[tokio::test]
async fn compressed_requests_get_compressed_answers() {
    use tonic::codec::CompressionEncoding;
    let (server, _client) = Server::ready(&[], &[]).await;
    let channel = server.channel().await;
    let request = || embed_request(vec![encoded(png(2))]);
    let plain = CrateMaeClient::new(channel.clone())
        .embed(request())
        .await
        .unwrap()
        .into_inner();
    for (encoding, name) in [
        (CompressionEncoding::Gzip, "gzip"),
        (CompressionEncoding::Zstd, "zstd"),
    ] {
        let mut client = CrateMaeClient::new(channel.clone())
            .send_compressed(encoding)
            .accept_compressed(encoding);
        let answer = client.embed(request()).await.unwrap();
        let used = answer
            .metadata()
            .get("grpc-encoding")
            .map(|v| v.to_str().unwrap().to_string());
        assert_eq!(used.as_deref(), Some(name), "{encoding:?}");
        assert_eq!(
            answer.into_inner().embeddings,
            plain.embeddings,
            "{encoding:?}"
        );
        // Accepting compression without sending it keeps the answer plain.
        let answer = CrateMaeClient::new(channel.clone())
            .accept_compressed(encoding)
            .embed(request())
            .await
            .unwrap();
        assert!(
            answer.metadata().get("grpc-encoding").is_none(),
            "{encoding:?}"
        );
    }
}

/// Benchmark, not a check (`bench/http2_streams.sh` runs it): the memory one open stream costs
/// with the stream limit lifted, so the limit's effect can be stated. One connection opens
/// 20,000 streams that never finish; prints the RSS before and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run by bench/http2_streams.sh"]
async fn memory_per_open_stream() {
    let _cores = exclusive().await;
    let (server, _client) = Server::ready_with(
        Weights::BuiltIn,
        &["--max-concurrent-streams", "1000000"],
        &[],
        None,
    )
    .await;
    let pid = server.child.id().unwrap();
    let authority = server.grpc.trim_start_matches("http://").to_string();
    let before = rss_mib(pid);
    let streams = 20_000;
    let held = flood_open_streams(&authority, streams).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss_mib(pid);
    let per_stream_kib = (after - before) * 1024.0 / f64::from(streams);
    println!(
        "{streams} open streams on one connection, no stream limit: RSS {before:.1} → {after:.1} MiB, {per_stream_kib:.1} KiB per stream"
    );
    drop(held);
}
