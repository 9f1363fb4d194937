//! The HTTP endpoint: `/metrics` for Prometheus, `/healthz` and `/readyz` for orchestrators.
//!
//! A small HTTP/1 server on the host's own runtime. `/healthz` answers 200
//! while the process runs; `/readyz` answers 200 while the host is ready
//! and 503 with the reason otherwise; `/metrics` answers every metric in
//! the OpenMetrics text format, which Prometheus reads.
//!
//! It holds at most [`MAX_CONNECTIONS`] connections at once, each for at
//! most [`CONNECTION_LIFETIME`], whatever its clients do (a client that
//! never reads its answers included). When they are all taken, up to
//! [`MAX_OVERFLOW`] more connections get one answer each within
//! [`OVERFLOW_LIFETIME`], the metrics included (renderings are shared, at
//! most ten a second, so an answer costs no rendering of its own);
//! beyond both limits, the oldest of those is closed for the newest. So
//! clients that hold every place cannot keep scrapes out, and clients
//! that keep opening connections cannot make the liveness probe fail.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
use tokio::task::AbortHandle;
use tracing::{debug, info};

/// Connections served in full at once. Scrapers and probes need a
/// handful.
const MAX_CONNECTIONS: usize = 32;

/// How long a connection may last, its answers written included, so a
/// client that stops reading does not hold its place for good.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);

/// Connections beyond [`MAX_CONNECTIONS`] answered once each, at once;
/// past that many, the oldest is closed for the newest.
const MAX_OVERFLOW: usize = 256;

/// How long such a connection may last.
const OVERFLOW_LIFETIME: Duration = Duration::from_secs(2);

/// A client that has not sent a request's headers within this time is
/// disconnected, so idle or stalled connections do not hold a place.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Most bytes of a request a connection buffers (hyper's least): a
/// request here is a line and a few headers.
const MAX_REQUEST_BUFFER: usize = 8192;

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
        // The overflow's connections, oldest first.
        let mut overflow: VecDeque<AbortHandle> = VecDeque::with_capacity(MAX_OVERFLOW);
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    debug!(target: "callme::server", error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            if let Ok(place) = places.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    serve(stream, true).await;
                    drop(place);
                });
                continue;
            }
            overflow.retain(|c| !c.is_finished());
            if overflow.len() >= MAX_OVERFLOW {
                // The oldest gives way: a probe, newest, is answered
                // however many connections a client keeps opening.
                if let Some(oldest) = overflow.pop_front() {
                    debug!(target: "callme::server", "metrics endpoint: every place taken, the oldest extra connection closed");
                    oldest.abort();
                }
            }
            overflow.push_back(tokio::spawn(serve(stream, false)).abort_handle());
        }
    }
}

/// Serves one connection: in `full` (kept alive), or with one answer.
async fn serve(stream: tokio::net::TcpStream, full: bool) {
    let (lifetime, header_timeout) = if full {
        (CONNECTION_LIFETIME, HEADER_TIMEOUT)
    } else {
        (OVERFLOW_LIFETIME, OVERFLOW_LIFETIME)
    };
    let connection = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        // hyper's least: requests here are a line and a few headers.
        .max_buf_size(MAX_REQUEST_BUFFER)
        .keep_alive(full)
        .serve_connection(TokioIo::new(stream), service_fn(respond));
    match tokio::time::timeout(lifetime, connection).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            debug!(target: "callme::server", error = %e, "metrics endpoint: connection ended");
        }
        Err(_) => {
            debug!(target: "callme::server", "metrics endpoint: connection closed after its time");
        }
    }
}

/// The answer to `request`.
async fn respond(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let response = match request.uri().path() {
        "/metrics" => match rendered().await {
            Some(metrics) => {
                let mut response = Response::new(Full::new(metrics));
                let headers = response.headers_mut();
                headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
                headers.insert(CONTENT_TYPE, HeaderValue::from_static(OPENMETRICS));
                response
            }
            None => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the metrics could not be rendered\n".into(),
            ),
        },
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

/// At most one rendering of the metrics starts in this time: scrapes
/// sent in a stream (on many connections, pipelined) cost the host about
/// ten renderings a second, not one each.
const RENDER_EVERY: Duration = Duration::from_millis(100);

/// The metrics as text, rendered off the runtime's workers (which talk to
/// the broker), one rendering at a time (a scrape that stops waiting
/// leaves its rendering to finish, the next scrapes waiting for it). A
/// scrape gets a rendering that started after it arrived: its own, or
/// one made while it waited.
/// `None` when rendering failed (it panicked): the scrape fails, rather
/// than every series seeming gone.
async fn rendered() -> Option<Bytes> {
    static RENDERED: Renderings = Renderings::new();
    RENDERED.get(super::render).await
}

/// Renderings shared by the scrapes that wait for them.
struct Renderings {
    /// The last rendering, and when it started.
    last: tokio::sync::Mutex<Option<(Instant, Bytes)>>,
}

impl Renderings {
    const fn new() -> Renderings {
        Renderings {
            last: tokio::sync::Mutex::const_new(None),
        }
    }

    /// A rendering by `render` that started after this call: the last
    /// one if it did, else a new one, at most one each [`RENDER_EVERY`].
    /// A new one is made by a task of its own, which holds the lock until
    /// it is done, whether or not this call still waits for it.
    async fn get(&'static self, render: fn() -> String) -> Option<Bytes> {
        let arrived = Instant::now();
        let mut last = self.last.lock().await;
        if let Some((started, text)) = &*last {
            if *started >= arrived {
                return Some(text.clone());
            }
            tokio::time::sleep_until((*started + RENDER_EVERY).into()).await;
        }
        let rendering = tokio::spawn(async move {
            let started = Instant::now();
            let text = tokio::task::spawn_blocking(render)
                .await
                .ok()
                .map(Bytes::from)?;
            *last = Some((started, text.clone()));
            Some(text)
        });
        rendering.await.ok().flatten()
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(PLAIN));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Scrapes that wait together for the metrics share one rendering,
    /// each gets one that started after it arrived, and renderings start
    /// at least [`RENDER_EVERY`] apart.
    #[tokio::test(flavor = "current_thread")]
    async fn scrapes_share_fresh_renderings_at_most_ten_a_second() {
        static RENDERS: AtomicUsize = AtomicUsize::new(0);
        fn render() -> String {
            format!("rendering {}", RENDERS.fetch_add(1, Ordering::SeqCst))
        }
        let mut starts = Vec::new();
        let renderings: &'static Renderings = Box::leak(Box::new(Renderings::new()));

        // 16 scrapes arrive while a rendering is under way (the lock is
        // held here): one rendering answers them all.
        let held = renderings.last.lock().await;
        let scrapes: Vec<_> = (0..16)
            .map(|_| tokio::spawn(renderings.get(render)))
            .collect();
        // On this one thread, every scrape runs up to the lock first.
        tokio::task::yield_now().await;
        drop(held);
        for scrape in scrapes {
            assert_eq!(scrape.await.unwrap().as_deref(), Some(&b"rendering 0"[..]));
        }
        assert_eq!(RENDERS.load(Ordering::SeqCst), 1);
        starts.extend(renderings.last.lock().await.as_ref().map(|(at, _)| *at));

        // Scrapes one after another each get a rendering of their own,
        // never the one before.
        for n in 1..4 {
            let text = renderings.get(render).await.unwrap();
            assert_eq!(text, format!("rendering {n}").as_bytes());
            starts.extend(renderings.last.lock().await.as_ref().map(|(at, _)| *at));
        }
        assert_eq!(starts.len(), 4);
        for pair in starts.windows(2) {
            assert!(pair[1] - pair[0] >= RENDER_EVERY, "{starts:?}");
        }
    }

    /// A scrape that stops waiting (its connection cut) while its
    /// rendering is under way leaves it to finish: the next scrape waits
    /// for it rather than starting another beside it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_scrape_given_up_leaves_no_second_rendering_beside_its_own() {
        static RUNNING: AtomicUsize = AtomicUsize::new(0);
        static MOST: AtomicUsize = AtomicUsize::new(0);
        static RENDERS: AtomicUsize = AtomicUsize::new(0);
        fn render() -> String {
            let running = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
            MOST.fetch_max(running, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(300));
            RUNNING.fetch_sub(1, Ordering::SeqCst);
            format!("rendering {}", RENDERS.fetch_add(1, Ordering::SeqCst))
        }
        let renderings: &'static Renderings = Box::leak(Box::new(Renderings::new()));
        let given_up = tokio::spawn(renderings.get(render));
        // Its rendering is under way, then it stops waiting.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(RUNNING.load(Ordering::SeqCst), 1);
        given_up.abort();
        let next = renderings.get(render).await;
        assert_eq!(next.as_deref(), Some(&b"rendering 1"[..]));
        assert_eq!(MOST.load(Ordering::SeqCst), 1, "two renderings ran at once");
        // The one given up was kept for the scrapes after it.
        assert_eq!(RENDERS.load(Ordering::SeqCst), 2);
    }
}
