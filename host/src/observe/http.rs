//! The HTTP endpoint: `/metrics` for Prometheus, `/healthz` and `/readyz` for orchestrators.
//!
//! A small HTTP/1 server on the host's own runtime. `/healthz` answers 200
//! while the process runs; `/readyz` answers 200 while the host is ready
//! and 503 with the reason otherwise; `/metrics` answers every metric in
//! the OpenMetrics text format, which Prometheus reads. It holds at most
//! [`MAX_CONNECTIONS`] connections at once, whatever its clients do.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info};

/// Connections served at once; more wait in the listen backlog. Scrapers
/// and probes need a handful.
const MAX_CONNECTIONS: usize = 32;

/// A client that has not sent a request's headers within this time is
/// disconnected, so idle or stalled connections do not hold a place.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Wait after a failed accept (out of file descriptors, say), so the loop
/// does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PLAIN: &str = "text/plain; charset=utf-8";

/// The metrics, health and readiness endpoint, bound and ready to serve.
pub struct Endpoint {
    listener: TcpListener,
}

impl Endpoint {
    /// Binds `addr` (`HOST:PORT`; port 0 picks a free one).
    ///
    /// # Errors
    ///
    /// When the address cannot be resolved or bound (in use, not local,
    /// a privileged port).
    pub async fn bind(addr: &str) -> std::io::Result<Endpoint> {
        let listener = TcpListener::bind(addr).await?;
        Ok(Endpoint { listener })
    }

    /// The address it listens on.
    ///
    /// # Errors
    ///
    /// When the socket cannot say (it practically always can).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves requests until the task running it is dropped.
    pub async fn run(self) {
        if let Ok(addr) = self.listener.local_addr() {
            info!(target: "callme::server", %addr, "metrics, health and readiness endpoint listening");
        }
        let places = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            // The semaphore is never closed.
            let Ok(place) = places.clone().acquire_owned().await else {
                return;
            };
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!(target: "callme::server", error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let served = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service_fn(respond))
                    .await;
                if let Err(e) = served {
                    debug!(target: "callme::server", error = %e, "metrics endpoint: connection ended");
                }
                drop(place);
            });
        }
    }
}

async fn respond(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let response = match request.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, super::render());
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match super::readiness() {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
        },
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz\n".into(),
        ),
    };
    Ok(response)
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(PLAIN));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
