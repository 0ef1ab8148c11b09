//! The HTTP side of every metaloop process, for Prometheus and Kubernetes: `GET /metrics`
//! (Prometheus text of everything recorded through the `metrics` facade), `GET /healthz` (the
//! process is alive and serving) and `GET /readyz` (200 once the process is ready: the
//! coordinator has its job loaded, a worker has joined one). Anything else is a 404.

use crate::metrics as names;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("installing the metrics recorder: {0}")]
    Recorder(String),
    #[error("binding the metrics endpoint {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// What the endpoint serves: the metrics and the readiness flag (shared with the process).
#[derive(Debug, Clone)]
pub struct Telemetry {
    handle: PrometheusHandle,
    pub ready: Arc<AtomicBool>,
}

/// Installs the process-wide metrics recorder (histogram buckets from `metrics::buckets`) and
/// describes every metric.
///
/// # Errors
/// When a recorder is already installed.
pub fn install() -> Result<Telemetry, HttpError> {
    let mut builder = PrometheusBuilder::new();
    for m in names::ALL.iter().filter(|m| m.kind == names::Kind::Histogram) {
        builder = builder
            .set_buckets_for_metric(Matcher::Full(m.name.to_string()), names::buckets(m.name))
            .map_err(|e| HttpError::Recorder(e.to_string()))?;
    }
    let handle = builder
        .install_recorder()
        .map_err(|e| HttpError::Recorder(e.to_string()))?;
    names::describe();
    Ok(Telemetry {
        handle,
        ready: Arc::new(AtomicBool::new(false)),
    })
}

/// Binds `addr` and serves the endpoints on a background task until the process ends.
/// Returns the bound address (useful with port 0).
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(addr: SocketAddr, telemetry: Telemetry) -> Result<SocketAddr, HttpError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| HttpError::Bind { addr, source })?;
    let upkeep = telemetry.handle.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let t = telemetry.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let t = t.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(&t, &req)) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(io, service);
                let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
            });
        }
    });
    Ok(local)
}

fn respond<B>(t: &Telemetry, req: &Request<B>) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, content_type: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static(content_type),
        );
        r
    };
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            t.handle.render(),
        ),
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" if t.ready.load(Ordering::Relaxed) => text(StatusCode::OK, PLAIN, "ready\n".into()),
        "/readyz" => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, "not ready\n".into()),
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}
