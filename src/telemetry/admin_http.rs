//! The admin HTTP listener (`--admin-listen`, loopback by default):
//!
//! - `GET /metrics`: Prometheus metrics as OpenMetrics text.
//! - `GET /healthz`: 200 while the process serves HTTP at all (liveness).
//! - `GET /readyz`: 200 when a valid bundle is served and leash is not
//!   draining, else 503 with the reason (readiness).
//!
//! Plain HTTP/1.1 on hyper: three fixed routes do not need a web framework.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::metrics::{Metrics, CONTENT_TYPE as METRICS_CONTENT_TYPE};
use crate::bundle::LiveBundle;

/// A slow client may take this long to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub metrics: Option<Arc<Metrics>>,
    pub live: Arc<LiveBundle>,
    /// Set when shutdown begins: readiness turns 503 while requests drain.
    pub draining: Arc<AtomicBool>,
    /// The audit trail, when leash fails closed on it: unwritable is not
    /// ready.
    pub audit: Option<Arc<crate::audit::AuditStatus>>,
}

/// Serves the admin endpoints on `listener` until `shutdown` completes;
/// connections still open then are closed.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    connections.spawn(async move {
                        let service = hyper::service::service_fn(move |req| {
                            let state = state.clone();
                            async move { Ok::<_, Infallible>(route(&state, &req)) }
                        });
                        let served = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                        if let Err(e) = served {
                            debug!(error = %e, "admin connection ended with an error");
                        }
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly
                    // rather than spin.
                    warn!(error = %e, "admin listener cannot accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
}

fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz");
    if !known {
        return text(
            StatusCode::NOT_FOUND,
            "not found: the admin listener serves /metrics, /healthz and /readyz\n".to_owned(),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} answers GET only\n"),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/metrics" => metrics(state),
        "/healthz" => text(StatusCode::OK, "ok\n".to_owned()),
        _ => ready(state),
    }
}

fn metrics(state: &AdminState) -> Response<Full<Bytes>> {
    let Some(metrics) = &state.metrics else {
        return text(
            StatusCode::NOT_FOUND,
            "metrics are off on this server\n".to_owned(),
        );
    };
    match metrics.encode() {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(METRICS_CONTENT_TYPE));
            response
        }
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n".to_owned(),
        ),
    }
}

fn ready(state: &AdminState) -> Response<Full<Bytes>> {
    if state.draining.load(Ordering::SeqCst) {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n".to_owned(),
        );
    }
    if let Some(audit) = state.audit.as_ref().filter(|a| !a.available()) {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: the audit trail cannot be written ({}); decisions are DENY\n",
                audit.last_error().unwrap_or_default()
            ),
        );
    }
    match state.live.current() {
        Some(snapshot) => text(
            StatusCode::OK,
            format!("ready: serving policy version {}\n", snapshot.version),
        ),
        None => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no valid policy bundle is loaded yet\n".to_owned(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
