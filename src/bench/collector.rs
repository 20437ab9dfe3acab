//! A span collector for measuring and testing leash's tracing: it speaks
//! OTLP/gRPC (the `TraceService`) and OTLP/HTTP with protobuf bodies
//! (`POST /v1/traces`) on loopback ports, and keeps or counts what arrives.
//! It can also stand for a collector that accepts connections and never
//! answers, which is what a stuck collector looks like to leash.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValueKind;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

/// One span as received, with its resource's attributes.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub span: Span,
    pub resource: Vec<KeyValue>,
}

impl ReceivedSpan {
    /// An attribute of the span rendered as text (arrays as `a,b`).
    pub fn attribute(&self, key: &str) -> Option<String> {
        attribute(&self.span.attributes, key)
    }

    /// An attribute of the resource rendered as text.
    pub fn resource_attribute(&self, key: &str) -> Option<String> {
        attribute(&self.resource, key)
    }

    /// Every attribute key of the span.
    pub fn attribute_keys(&self) -> Vec<String> {
        self.span
            .attributes
            .iter()
            .map(|kv| kv.key.clone())
            .collect()
    }
}

fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
        .map(render)
}

fn render(v: &AnyValueKind) -> String {
    match v {
        AnyValueKind::StringValue(s) => s.clone(),
        AnyValueKind::BoolValue(b) => b.to_string(),
        AnyValueKind::IntValue(i) => i.to_string(),
        AnyValueKind::DoubleValue(d) => d.to_string(),
        AnyValueKind::ArrayValue(a) => a
            .values
            .iter()
            .filter_map(|v| v.value.as_ref())
            .map(render)
            .collect::<Vec<_>>()
            .join(","),
        other => format!("{other:?}"),
    }
}

#[derive(Debug, Default)]
struct State {
    /// Keep the spans (tests) or only count them (benchmark).
    keep: bool,
    /// Accept requests and never answer them.
    hang: AtomicBool,
    received: AtomicU64,
    requests: AtomicU64,
    spans: Mutex<Vec<ReceivedSpan>>,
    arrived: Notify,
}

impl State {
    fn take(&self, request: ExportTraceServiceRequest) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut count = 0u64;
        let mut kept = Vec::new();
        for resource_spans in request.resource_spans {
            let resource = resource_spans
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                count += scope.spans.len() as u64;
                if self.keep {
                    kept.extend(scope.spans.into_iter().map(|span| ReceivedSpan {
                        span,
                        resource: resource.clone(),
                    }));
                }
            }
        }
        if self.keep {
            self.spans
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(kept);
        }
        self.received.fetch_add(count, Ordering::Relaxed);
        self.arrived.notify_waiters();
    }

    async fn answer_or_hang(&self) {
        if self.hang.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    }
}

/// A running collector: an OTLP/gRPC port and an OTLP/HTTP port.
#[derive(Debug)]
pub struct SpanCollector {
    state: Arc<State>,
    grpc: SocketAddr,
    http: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

impl SpanCollector {
    /// Starts a collector on two free loopback ports. `keep` keeps every
    /// span for inspection; otherwise spans are only counted.
    pub async fn start(keep: bool) -> std::io::Result<Self> {
        let state = Arc::new(State {
            keep,
            ..State::default()
        });
        let grpc_listener = TcpListener::bind("127.0.0.1:0").await?;
        let http_listener = TcpListener::bind("127.0.0.1:0").await?;
        let grpc = grpc_listener.local_addr()?;
        let http = http_listener.local_addr()?;
        let service = TraceServiceServer::new(GrpcReceiver(state.clone()));
        let grpc_task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(grpc_listener))
                .await;
        });
        let http_task = tokio::spawn(serve_http(http_listener, state.clone()));
        Ok(Self {
            state,
            grpc,
            http,
            tasks: vec![grpc_task, http_task],
        })
    }

    /// The OTLP/gRPC endpoint (`--otlp-endpoint` with `grpc`).
    pub fn grpc_endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// The OTLP/HTTP base endpoint (`--otlp-endpoint` with `http/protobuf`).
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http)
    }

    /// From now on, accept export requests and never answer them.
    pub fn hang(&self) {
        self.state.hang.store(true, Ordering::Relaxed);
    }

    /// Spans received so far.
    pub fn span_count(&self) -> u64 {
        self.state.received.load(Ordering::Relaxed)
    }

    /// Export requests received so far (answered or not).
    pub fn request_count(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// The spans kept so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.state
            .spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until at least `n` spans arrived, up to `timeout`; returns the
    /// count reached.
    pub async fn wait_for(&self, n: u64, timeout: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.state.arrived.notified();
            let count = self.span_count();
            if count >= n {
                return count;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.span_count();
            }
        }
    }
}

impl Drop for SpanCollector {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

struct GrpcReceiver(Arc<State>);

#[tonic::async_trait]
impl TraceService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.take(request.into_inner());
        self.0.answer_or_hang().await;
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn serve_http(listener: TcpListener, state: Arc<State>) {
    while let Ok((stream, _)) = listener.accept().await {
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(receive_http(&state, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn receive_http(
    state: &State,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Full<Bytes>> {
    let status = |code: u16| {
        let mut response = hyper::Response::new(Full::new(Bytes::new()));
        *response.status_mut() = hyper::StatusCode::from_u16(code).unwrap_or_default();
        response
    };
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/traces" {
        return status(404);
    }
    let body = match req.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return status(400),
    };
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => state.take(request),
        Err(_) => return status(400),
    }
    state.answer_or_hang().await;
    let mut response = hyper::Response::new(Full::new(Bytes::from(
        ExportTraceServiceResponse {
            partial_success: None,
        }
        .encode_to_vec(),
    )));
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/x-protobuf"),
    );
    response
}
