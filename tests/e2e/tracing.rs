//! OpenTelemetry export, checked against an OTLP receiver built here on the OTLP protobuf
//! definitions (a real gRPC `TraceService`, not a mock of the exporter).

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use tokio::sync::mpsc;

use crate::support::*;

struct Receiver(mpsc::UnboundedSender<ExportTraceServiceRequest>);

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spans_reach_an_otlp_collector_and_continue_the_callers_trace() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = listener.local_addr().unwrap();
    let (tx, mut rx) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Receiver(tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let endpoint = format!("http://{collector}");
    let (mut server, mut client) = Server::ready(&["--otlp-endpoint", &endpoint], &[]).await;

    // The caller's trace, as a W3C traceparent: version, trace id, parent span id, flags.
    let (trace_id, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let mut request = tonic::Request::new(embed_request(vec![encoded(png(3))]));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent}-01").parse().unwrap(),
    );
    client.embed(request).await.unwrap();
    // Export is batched; shutting down flushes what is buffered.
    server.terminate();
    assert!(server.child.wait().await.unwrap().success());

    let mut spans: Vec<Span> = vec![];
    while let Ok(Some(batch)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
        for resource in batch.resource_spans {
            let service = resource
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .map(|a| format!("{:?}", a.value));
            assert!(
                service
                    .as_deref()
                    .is_some_and(|s| s.contains("crate-mae-serve")),
                "service name: {service:?}"
            );
            for scope in resource.scope_spans {
                spans.extend(scope.spans);
            }
        }
    }
    let ours: Vec<&Span> = spans
        .iter()
        .filter(|s| hex(&s.trace_id) == trace_id)
        .collect();
    let named = |name: &str| -> &Span {
        ours.iter().find(|s| s.name == name).unwrap_or_else(|| {
            panic!(
                "no `{name}` span in the caller's trace: {:?}",
                ours.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        })
    };
    let request = named("request");
    assert_eq!(
        hex(&request.parent_span_id),
        parent,
        "continues the caller's span"
    );
    for child in ["preprocess", "queue", "batch"] {
        assert_eq!(
            named(child).parent_span_id,
            request.span_id,
            "`{child}` is a child of the request"
        );
    }
    let batch = named("batch");
    let model = named("model");
    assert_eq!(
        model.parent_span_id, batch.span_id,
        "`model` runs inside the batch"
    );
    let (queue, request) = (named("queue"), named("request"));
    assert!(queue.end_time_unix_nano <= batch.start_time_unix_nano + 1_000_000);
    assert!(request.end_time_unix_nano >= model.end_time_unix_nano);
}
