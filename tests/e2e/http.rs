//! The HTTP listener: the Open Inference Protocol's REST form (JSON and Triton's binary-data
//! extension) and the OpenAI-style `/v1/embeddings`, both answering what gRPC answers; the
//! README's curl examples, run as written; and hostile HTTP, each a clear 4xx.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::support::*;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn le_floats(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The gRPC embeddings of `images` (PNG files), `normalize` as asked, the model's pooling.
async fn grpc_embeddings(
    client: &mut CrateMaeClient<Channel>,
    images: &[Vec<u8>],
    normalize: bool,
) -> Vec<Vec<f32>> {
    let r = client
        .embed(EmbedRequest {
            normalize,
            ..embed_request(images.iter().cloned().map(encoded).collect())
        })
        .await
        .unwrap()
        .into_inner();
    r.embeddings.into_iter().map(|e| e.values).collect()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let diff = max_abs_diff(a, b);
    assert!(diff <= 1e-6, "{what}: differs from gRPC by {diff}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_inference_protocol_rest_answers_as_grpc_does() {
    let (server, mut client) = Server::ready(&[], &[]).await;
    let at = server.http;
    let get = |path: &'static str| http_call(at, "GET", path, &[], b"");

    let live = get("/v2/health/live").await;
    assert_eq!((live.status, live.json()), (200, json!({"live": true})));
    assert_eq!(get("/v2/health/ready").await.status, 200);
    let meta = get("/v2").await.json();
    assert_eq!(meta["name"], "crate-mae-serve");
    assert!(meta["extensions"]
        .as_array()
        .unwrap()
        .contains(&json!("statistics")));
    let model = get("/v2/models/crate-mae").await.json();
    let inputs: Vec<&str> = model["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(inputs, ["image", "pixels"]);
    assert_eq!(
        get("/v2/models/crate-mae/versions/1/ready").await.status,
        200
    );
    let unknown = get("/v2/models/nope").await;
    assert_eq!(unknown.status, 404);
    assert!(unknown.json()["error"].as_str().unwrap().contains("nope"));
    let config = get("/v2/models/crate-mae-complete/config").await.json();
    assert_eq!(config["max_batch_size"], MAX_IMAGES);
    assert_eq!(config["input"][0]["optional"], true);
    assert_eq!(config["dynamic_batching"]["priority_levels"], 2);
    assert!(config["parameters"]["kernel"]["string_value"]
        .as_str()
        .is_some_and(|k| !k.is_empty()));
    assert_eq!(
        config["parameters"]["small_image_fit"]["string_value"],
        "resize"
    );

    // JSON: BYTES elements as base64 (one as a data URI), the model's pooling, unit norm.
    let pngs = [png(11), png(12)];
    let expected = grpc_embeddings(&mut client, &pngs, true).await;
    let request = json!({
        "id": "rest-1",
        "parameters": {"normalize": true},
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2, 1],
                    "data": [b64(&pngs[0]), format!("data:image/png;base64,{}", b64(&pngs[1]))]}],
    });
    let reply = http_call(
        at,
        "POST",
        "/v2/models/crate-mae/infer",
        &[
            ("Content-Type", "application/json"),
            ("x-request-id", "abc-123"),
        ],
        &serde_json::to_vec(&request).unwrap(),
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(reply.header("x-request-id"), Some("abc-123"));
    assert_eq!(reply.header("x-model-name"), Some("crate-mae"));
    let body = reply.json();
    assert_eq!(body["id"], "rest-1");
    let out = &body["outputs"][0];
    assert_eq!(out["name"], "embedding");
    let d = expected[0].len();
    assert_eq!(out["shape"], json!([2, d]));
    let values = floats(&out["data"]);
    assert_close(&values[..d], &expected[0], "JSON image 0");
    assert_close(&values[d..], &expected[1], "JSON image 1 (data URI)");

    // Triton's binary extension both ways: a JSON header, then the length-prefixed files.
    let mut tensor = Vec::new();
    for p in &pngs {
        tensor.extend_from_slice(&(p.len() as u32).to_le_bytes());
        tensor.extend_from_slice(p);
    }
    let head = serde_json::to_vec(&json!({
        "parameters": {"normalize": true, "binary_data_output": true},
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2],
                    "parameters": {"binary_data_size": tensor.len()}}],
    }))
    .unwrap();
    let length = head.len().to_string();
    let mut body = head;
    body.extend_from_slice(&tensor);
    let reply = http_call(
        at,
        "POST",
        "/v2/models/crate-mae/infer",
        &[
            ("Content-Type", "application/octet-stream"),
            ("Inference-Header-Content-Length", &length),
        ],
        &body,
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let json_len: usize = reply
        .header("inference-header-content-length")
        .expect("a binary answer says where its JSON ends")
        .parse()
        .unwrap();
    let head: Value = serde_json::from_slice(&reply.body[..json_len]).unwrap();
    assert_eq!(
        head["outputs"][0]["parameters"]["binary_data_size"],
        2 * d * 4
    );
    let values = le_floats(&reply.body[json_len..]);
    assert_close(&values[..d], &expected[0], "binary image 0");
    assert_close(&values[d..], &expected[1], "binary image 1");

    // FP32 pixels as nested JSON, and completion: PNGs as base64, the mask as bools.
    let s = IMAGE_SIZE as usize;
    let plane: Vec<Value> = (0..3).map(|_| json!(vec![vec![0.25f32; s]; s])).collect();
    let pixels = http_json(
        at,
        "/v2/models/crate-mae/infer",
        &json!({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, s, s], "data": [plane]}]}),
    )
    .await;
    assert_eq!(
        pixels.status,
        200,
        "{}",
        String::from_utf8_lossy(&pixels.body)
    );
    assert_eq!(floats(&pixels.json()["outputs"][0]["data"]).len(), d);
    let done = http_json(
        at,
        "/v2/models/crate-mae-complete/infer",
        &json!({"parameters": {"mask_ratio": 0.5, "seed": 3},
                "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(&pngs[0])]}],
                "outputs": [{"name": "composite"}, {"name": "mask"}]}),
    )
    .await;
    assert_eq!(done.status, 200, "{}", String::from_utf8_lossy(&done.body));
    let done = done.json();
    let composite = base64::engine::general_purpose::STANDARD
        .decode(done["outputs"][0]["data"][0].as_str().unwrap())
        .unwrap();
    assert!(composite.starts_with(b"\x89PNG"), "composite is a PNG");
    let hidden = done["outputs"][1]["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m.as_bool().unwrap())
        .count();
    let patches = done["outputs"][1]["shape"][1].as_u64().unwrap() as usize;
    assert_eq!(hidden, patches / 2, "mask_ratio 0.5 hides half the patches");

    // HTTP/2 with prior knowledge (h2c) on the same port.
    let tcp = tokio::net::TcpStream::connect(at).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let (answer, _) = h2
        .send_request(
            http::Request::get(format!("http://{at}/v2/health/ready"))
                .body(())
                .unwrap(),
            true,
        )
        .unwrap();
    assert_eq!(answer.await.unwrap().status(), 200, "h2c");

    let stats = get("/v2/models/crate-mae/stats").await.json();
    assert!(stats["model_stats"][0]["inference_count"].as_u64().unwrap() >= 4);
    let scraped = server.scrape().await;
    let ok = metric(
        &scraped,
        r#"cratemae_requests_total{protocol="oip.v2.rest",method="ModelInfer",code="OK"}"#,
    );
    assert_eq!(ok, Some(4.0), "REST calls are counted under their protocol");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn openai_embeddings_match_grpc_and_refuse_what_they_cannot_serve() {
    let (server, mut client) = Server::ready(&[], &[]).await;
    let at = server.http;
    let pngs = [png(21), png(22)];
    let expected = grpc_embeddings(&mut client, &pngs, true).await;
    let uri = |p: &[u8]| format!("data:image/png;base64,{}", b64(p));
    let reply = http_json(
        at,
        "/v1/embeddings",
        &json!({"model": "crate-mae", "input": [uri(&pngs[0]), b64(&pngs[1])]}),
    )
    .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let body = reply.json();
    assert_eq!(body["object"], "list");
    assert_eq!(body["model"], "crate-mae");
    for (i, want) in expected.iter().enumerate() {
        assert_eq!(body["data"][i]["index"], i);
        assert_close(&floats(&body["data"][i]["embedding"]), want, "openai float");
    }
    let norm: f32 = expected[0].iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "unit length by default: {norm}");
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    let d = expected[0].len();
    let reply = http_json(
        at,
        "/v1/embeddings",
        &json!({"model": "crate-mae", "input": uri(&pngs[0]), "encoding_format": "base64", "dimensions": d}),
    )
    .await
    .json();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(reply["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    assert_close(&le_floats(&raw), &expected[0], "openai base64");

    let models = http_call(at, "GET", "/v1/models", &[], b"").await.json();
    assert_eq!(models["data"][0]["id"], "crate-mae");

    // Each refusal in OpenAI's error shape, with a message that names the problem.
    let cases: Vec<(Value, u16, &str)> = vec![
        (
            json!({"model": "text-embedding-3-small", "input": uri(&pngs[0])}),
            404,
            "does not exist",
        ),
        (
            json!({"model": "crate-mae", "input": "https://example.com/cat.png"}),
            400,
            "not fetched",
        ),
        (
            json!({"model": "crate-mae", "input": [101, 102]}),
            400,
            "token",
        ),
        (
            json!({"model": "crate-mae", "input": "a photo of a cat"}),
            400,
            "text is not supported",
        ),
        (
            json!({"model": "crate-mae", "input": uri(&pngs[0]), "dimensions": 3}),
            400,
            "dimensions",
        ),
        (
            json!({"model": "crate-mae", "input": uri(&pngs[0]), "encoding_format": "int8"}),
            400,
            "encoding_format",
        ),
        (json!({"model": "crate-mae", "input": []}), 400, "empty"),
        (
            json!({"model": "crate-mae", "input": uri(b"not a png")}),
            400,
            "image",
        ),
        (
            json!({"model": "crate-mae", "input": uri(&pngs[0]), "colour": "red"}),
            400,
            "colour",
        ),
    ];
    for (request, status, needle) in cases {
        let reply = http_json(at, "/v1/embeddings", &request).await;
        let error = &reply.json()["error"];
        let message = error["message"].as_str().unwrap_or("");
        assert_eq!(reply.status, status, "{request}: {message}");
        assert!(
            message.contains(needle) && error["type"].is_string(),
            "{request}: {error}"
        );
    }
    assert_eq!(
        metric(
            &server.scrape().await,
            r#"cratemae_requests_total{protocol="openai",method="Embeddings",code="OK"}"#
        ),
        Some(2.0)
    );
}

/// The README's curl block (the one after `<!-- curl examples: checked by tests/e2e/http.rs -->`),
/// each command run as written from the repository root against the built-in model, with
/// only the port changed; each must print JSON without an `error`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readme_curl_examples_run_as_written() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let marker = "<!-- curl examples: checked by tests/e2e/http.rs -->";
    let block = readme
        .split_once(marker)
        .expect("the README marks its curl examples")
        .1
        .split_once("```sh\n")
        .unwrap()
        .1
        .split_once("```")
        .unwrap()
        .0;
    let commands: Vec<String> = block
        .replace("\\\n", " ")
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("curl"))
        .map(str::to_owned)
        .collect();
    assert!(commands.len() >= 4, "curl examples: {commands:?}");
    let (server, _client) = Server::ready_with(Weights::BuiltIn, &[], &[], None).await;
    for command in commands {
        let command = command.replace("localhost:8000", &server.http.to_string());
        let out = Command::new("bash")
            .args(["-o", "pipefail", "-c", &command])
            .current_dir(&root)
            .output()
            .await
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let value: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{command} printed no JSON ({e}): {stdout}"));
        assert!(value.get("error").is_none(), "{command}: {value}");
    }
}

/// What a hostile or broken HTTP client sends, each answered with a clear 4xx, the server
/// serving throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_http_gets_clear_refusals_and_the_server_keeps_serving() {
    let (server, mut client) = Server::ready(
        &["--max-message-mib", "1", "--http-read-timeout-secs", "1"],
        &[],
    )
    .await;
    let at = server.http;
    let infer = "/v2/models/crate-mae/infer";
    let json_type = [("Content-Type", "application/json")];
    let good = json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(&png(5))]}]});
    // What is sent (headers, body), and the status and message part expected.
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Vec<u8>, u16, &'a str);
    let cases: Vec<Case> = vec![
        ("bad JSON", json_type.to_vec(), b"{\"inputs\": [".to_vec(), 400, "not valid inference JSON"),
        ("JSON of the wrong shape", json_type.to_vec(), b"[1, 2]".to_vec(), 400, "not valid inference JSON"),
        ("a form body", vec![("Content-Type", "application/x-www-form-urlencoded")], b"a=b".to_vec(), 415, "application/json"),
        ("a text body", vec![("Content-Type", "text/plain")], b"hello".to_vec(), 415, "application/json"),
        ("a compressed body", vec![("Content-Type", "application/json"), ("Content-Encoding", "br")], b"x".to_vec(), 415, "Content-Encoding"),
        ("a binary header longer than the body", vec![("Inference-Header-Content-Length", "9999")], b"{}".to_vec(), 400, "Inference-Header-Content-Length"),
        ("a binary header that is not a number", vec![("Inference-Header-Content-Length", "ten")], b"{}".to_vec(), 400, "whole number"),
        ("BYTES that are not base64", json_type.to_vec(),
         serde_json::to_vec(&json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]})).unwrap(), 400, "base64"),
        ("a file that is not an image", json_type.to_vec(),
         serde_json::to_vec(&json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(b"GIF89a")]}]})).unwrap(), 400, "image"),
        ("a shape that disagrees with the data", json_type.to_vec(),
         serde_json::to_vec(&json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3], "data": [b64(&png(5))]}]})).unwrap(), 400, "elements"),
        ("more images than a request may hold", json_type.to_vec(),
         serde_json::to_vec(&json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [MAX_IMAGES + 1],
             "data": vec![b64(&png(5)); MAX_IMAGES + 1]}]})).unwrap(), 413, "images"),
        ("an unknown parameter", json_type.to_vec(),
         serde_json::to_vec(&json!({"parameters": {"poolng": "mean"}, "inputs": good["inputs"]})).unwrap(), 400, "poolng"),
        ("a parameter of the wrong type", json_type.to_vec(),
         serde_json::to_vec(&json!({"parameters": {"pooling": ["mean"]}, "inputs": good["inputs"]})).unwrap(), 400, "pooling"),
    ];
    for (what, headers, body, status, needle) in cases {
        let reply = http_call(at, "POST", infer, &headers, &body).await;
        let message = reply.json()["error"].as_str().unwrap_or("").to_string();
        assert_eq!(reply.status, status, "{what}: {message}");
        assert!(message.contains(needle), "{what}: {message}");
    }
    // A body declared over the limit is refused from its Content-Length, before it is sent.
    let mut big = tokio::net::TcpStream::connect(at).await.unwrap();
    big.write_all(
        format!("POST {infer} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", (1 << 20) + 1).as_bytes(),
    )
    .await
    .unwrap();
    let reply = read_reply(&mut big).await;
    let message = reply.json()["error"].as_str().unwrap_or("").to_string();
    assert_eq!(reply.status, 413, "a body over the limit: {message}");
    assert!(message.contains("--max-message-mib"), "{message}");
    let reply = http_call(at, "GET", "/v2/models/crate-mae/infer", &[], b"").await;
    assert_eq!(reply.status, 405, "GET on infer");
    let reply = http_call(at, "GET", "/v3/nothing", &[], b"").await;
    assert_eq!(reply.status, 404);
    assert!(reply.json()["error"].as_str().unwrap().contains("/v2"));

    // A body that never finishes arriving: 408 after the read timeout, not a held slot.
    let mut slow = tokio::net::TcpStream::connect(at).await.unwrap();
    slow.write_all(
        format!("POST {infer} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"inp").as_bytes(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let reply = tokio::time::timeout(Duration::from_secs(10), read_reply(&mut slow))
        .await
        .expect("a slow body is answered");
    assert_eq!(
        reply.status,
        408,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Headers that never finish: the connection is closed after the read timeout.
    let mut slowloris = tokio::net::TcpStream::connect(at).await.unwrap();
    slowloris
        .write_all(b"GET /v2 HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed =
        tokio::time::timeout(Duration::from_secs(10), slowloris.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "a connection with unfinished headers is closed"
    );

    // Still serving, over HTTP and gRPC.
    let reply = http_json(at, infer, &good).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let r = client
        .embed(embed_request(vec![encoded(png(5))]))
        .await
        .unwrap();
    assert_eq!(r.into_inner().embeddings.len(), 1);
}
