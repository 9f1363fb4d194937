//! The `http` capability: outbound HTTP through the standard `wasi:http/outgoing-handler`, to the hosts a sidecar allows, with a response size cap and a time limit.
//!
//! `wasi:http` is linked for every plugin, and a plugin that imports it
//! loads whatever its sidecar says; every request is checked here, in
//! the `send_request` hook of `wasmtime-wasi-http`, before any name is
//! looked up or any connection is made. A request whose authority (host
//! and port, the port defaulting to 80 for `http` and 443 for `https`) is
//! not in the sidecar's `allowed_hosts` is refused with
//! `HttpRequestDenied`; so is every request of a plugin granted nothing.
//! The check is on the name as the guest wrote it, not on the address it
//! resolves to.
//!
//! An allowed request gets `http_timeout_ms` in all, from the request to
//! the last byte of the response body (`HttpResponseTimeout` after
//! that), and a body of at most `http_max_response_bytes`: a response
//! whose `Content-Length` is over the cap is refused before its body is
//! read (`HttpResponseBodySize` with that length), and a body that grows
//! past the cap while it streams ends with an error on the body's stream
//! (the guest has read at most the cap; nothing tells it the body ended).
//! The call's own deadline still applies around all of it.
//!
//! How a request is sent (names looked up under a bound per plugin, the
//! connection, TLS) is in `send.rs` beside this file; the bounds on what
//! a request not yet sent may hold (its method, authority and path) in
//! `parts.rs`; the bounds on the response heads a call and a kept
//! instance receive in `heads.rs`.
//!
//! Requests run on a small runtime of their own (one thread, started
//! with the first request allowed), whatever runtime the call runs on:
//! the server's plugin executor has no I/O driver, and guests' sockets
//! stay apart from the broker's. Dropping a request (the guest drops it,
//! or its call ends) stops it there too, and so does the end of its call
//! when the guest keeps it (an instance kept for the next call).

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use hyper::http::uri::{Authority, Scheme};
use hyper::http::{self, Uri, header};
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
use wasmtime_wasi_http::{
    Error as HttpError, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks,
    WasiHttpView,
};

use crate::observe;
use crate::plugin::sandbox::CallState;

mod heads;
pub(super) mod parts;
mod read_count;
mod send;

use heads::Heads;

/// Largest response body by default: a page or a JSON document, not a
/// download. The guest holds it in its linear memory.
pub const DEFAULT_HTTP_MAX_RESPONSE_BYTES: u64 = 1 << 20;

/// Time one request may take by default, from sending it to the last byte
/// of the response: the call's default deadline, so that a slow server
/// gives the guest an error it can handle rather than ending the call.
pub const DEFAULT_HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection outlives its request's time limit: long enough
/// for the body to fail with the timeout first.
const CONNECTION_GRACE: Duration = Duration::from_secs(1);

/// Largest `http_max_response_bytes`: a guest's linear memory is at most
/// 4 GiB, so it could never hold more.
pub(crate) const MAX_HTTP_RESPONSE_BYTES: u64 = 4 << 30;

/// Requests one call of a plugin may send by default: enough for any
/// sensible use, few enough that a plugin looping on requests cannot
/// flood the hosts it may reach for its whole deadline.
pub const DEFAULT_HTTP_MAX_REQUESTS: u32 = 256;

/// Most requests a sidecar may allow one call to send.
pub(crate) const MAX_HTTP_REQUESTS: u32 = 100_000;

/// The hosts a plugin may send HTTP requests to, and the limits of each
/// request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpGrant {
    /// `host:port`, the host in lower case.
    hosts: Arc<BTreeSet<String>>,
    /// Largest response body, in bytes.
    pub max_response_bytes: u64,
    /// Time one request may take, response body included.
    pub timeout: Duration,
    /// Most requests one call of the plugin may send (256 by default).
    pub max_requests: u32,
}

impl Default for HttpGrant {
    fn default() -> Self {
        HttpGrant {
            hosts: Arc::default(),
            max_response_bytes: DEFAULT_HTTP_MAX_RESPONSE_BYTES,
            timeout: DEFAULT_HTTP_TIMEOUT,
            max_requests: DEFAULT_HTTP_MAX_REQUESTS,
        }
    }
}

/// An `allowed_hosts` entry that is not `HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`allowed_hosts` entry `{}` is not HOST:PORT: {reason}", entry.escape_debug())]
pub struct InvalidHost {
    /// The entry as written.
    pub entry: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// The `host:port` an entry or a request names, the host in lower case.
fn host_port(host: &str, port: u16) -> String {
    format!("{}:{port}", host.to_ascii_lowercase())
}

/// Parses one `allowed_hosts` entry.
fn parse_entry(entry: &str) -> Result<String, InvalidHost> {
    let invalid = |reason| InvalidHost {
        entry: entry.to_string(),
        reason,
    };
    if entry.contains('@') {
        return Err(invalid("user information is not part of a host"));
    }
    let authority = Authority::from_str(entry).map_err(|_| invalid("not a host and port"))?;
    if authority.host().is_empty() {
        return Err(invalid("the host is empty"));
    }
    // The URI grammar lets a host hold these, and no request's host
    // matches them: a pattern that looks like it grants much would grant
    // nothing.
    if authority.host().contains(['*', '?', '%']) {
        return Err(invalid(
            "a host is a name or an address: there is no wildcard (list each host)",
        ));
    }
    match authority.port_u16() {
        Some(0) => Err(invalid("port 0")),
        Some(port) => Ok(host_port(authority.host(), port)),
        None => Err(invalid(
            "the port is missing (443 for https, 80 for http: say which)",
        )),
    }
}

impl HttpGrant {
    /// A grant of requests to `hosts`, each `HOST:PORT`
    /// (`api.example.com:443`, `127.0.0.1:8080`, `[::1]:8080`), with
    /// these limits.
    ///
    /// # Errors
    ///
    /// [`InvalidHost`] for an entry without a port, with user
    /// information, or that is no host at all.
    pub fn new<S: AsRef<str>>(
        hosts: impl IntoIterator<Item = S>,
        max_response_bytes: u64,
        timeout: Duration,
    ) -> Result<HttpGrant, InvalidHost> {
        let hosts = hosts
            .into_iter()
            .map(|h| parse_entry(h.as_ref()))
            .collect::<Result<_, _>>()?;
        Ok(HttpGrant {
            hosts: Arc::new(hosts),
            max_response_bytes,
            timeout,
            max_requests: DEFAULT_HTTP_MAX_REQUESTS,
        })
    }

    /// The same grant, letting one call of the plugin send `max_requests`
    /// requests.
    #[must_use]
    pub fn with_max_requests(self, max_requests: u32) -> HttpGrant {
        HttpGrant {
            max_requests,
            ..self
        }
    }

    /// Whether any host is granted.
    pub fn is_granted(&self) -> bool {
        !self.hosts.is_empty()
    }

    /// Whether requests to `host` on `port` are granted.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        self.is_granted() && self.hosts.contains(&host_port(host, port))
    }

    /// The `host:port` entries granted, sorted.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.hosts.iter().map(String::as_str)
    }

    /// The entry that grants a request to `uri`, if one does: its host
    /// and port, the port defaulting to the scheme's. An authority with
    /// user information (`user@host`) is never granted: the connection
    /// would go to the whole string, not to the host checked.
    fn entry_for(&self, uri: &Uri) -> Option<&str> {
        let authority = uri.authority()?;
        if authority.as_str().contains('@') {
            return None;
        }
        let port = authority.port_u16().or_else(|| match uri.scheme() {
            Some(s) if *s == Scheme::HTTP => Some(80),
            Some(s) if *s == Scheme::HTTPS => Some(443),
            _ => None,
        })?;
        self.hosts
            .get(&host_port(authority.host(), port))
            .map(String::as_str)
    }
}

/// What the host holds for a request's headers (one `fields`), and how
/// much of a request's body it takes per write, while a request is being
/// made: small, because a guest may make many requests it never sends
/// (only sending is checked), each holding that much of the host's memory
/// outside the guest's linear memory. With the store's handle limit
/// (`sandbox::MAX_HOST_HANDLES`, 4,096) and the bounds on a request's
/// method, authority and path (`parts.rs`), that bounds what one call can
/// make the host hold: about 10 MiB for a plugin granted nothing, 100 MiB
/// for one granted HTTP.
const FIELDS_BYTES_GRANTED: usize = 16 << 10;
const FIELDS_BYTES_NOT_GRANTED: usize = 1 << 10;
const BODY_CHUNK_GRANTED: usize = 16 << 10;
const BODY_CHUNK_NOT_GRANTED: usize = 1 << 10;

/// The `wasi:http` part of a store: the crate's context and the hooks that
/// check and limit every request.
pub(crate) struct HttpState {
    ctx: WasiHttpCtx,
    hooks: HttpHooks,
}

impl Default for HttpState {
    /// As for a plugin granted nothing, which is what a store is until a
    /// call begins (a spare's start-up code runs before).
    fn default() -> Self {
        let mut ctx = WasiHttpCtx::new();
        ctx.set_field_size_limit(FIELDS_BYTES_NOT_GRANTED);
        HttpState {
            ctx,
            hooks: HttpHooks::default(),
        }
    }
}

impl HttpState {
    /// The state for the instance's next call, once this one's has
    /// ended: nothing of the call's, the count of the instance's heads.
    pub(super) fn ended(&self) -> HttpState {
        let mut next = HttpState::default();
        next.hooks.heads = self.hooks.heads.next_call();
        next
    }

    /// Whether the instance has received too much in response heads to
    /// be kept for another call.
    pub(super) fn is_spent(&self) -> bool {
        self.hooks.heads.instance_spent()
    }

    /// Arms the hooks with what the sidecar grants. A plugin granted
    /// nothing costs its calls nothing here.
    pub(super) fn begin(&mut self, grant: &HttpGrant) {
        self.hooks.grant = grant.is_granted().then(|| grant.clone());
        self.hooks.sent = 0;
        self.hooks.denied = 0;
        self.ctx.set_field_size_limit(if grant.is_granted() {
            FIELDS_BYTES_GRANTED
        } else {
            FIELDS_BYTES_NOT_GRANTED
        });
    }
}

/// Checks requests against the grant before anything is sent, and
/// limits what is sent.
#[derive(Default)]
struct HttpHooks {
    /// None: nothing granted, every request refused.
    grant: Option<HttpGrant>,
    /// Requests the call being served has sent.
    sent: u32,
    /// Requests it was refused (not granted, or over its limit): only the
    /// first is logged.
    denied: u32,
    /// Their tasks, stopped when the call ends (these hooks are dropped
    /// then), even where the guest keeps their futures: an instance kept
    /// for the next call (`reuse_instances`) keeps its resource table.
    running: Vec<tokio::task::AbortHandle>,
    /// The connections of their responses, which outlive the requests'
    /// tasks while the guest holds a response body: stopped with them.
    connections: Connections,
    /// For the log.
    plugin: Option<Arc<str>>,
    /// The response heads the call and its instance have received.
    heads: Heads,
}

impl Drop for HttpHooks {
    fn drop(&mut self) {
        for task in self.running.drain(..) {
            task.abort();
        }
        self.connections.end();
    }
}

/// The tasks of a call's response connections, shared with the requests'
/// tasks that start them; `None` once the call ended.
#[derive(Clone)]
struct Connections(Arc<std::sync::Mutex<Option<Vec<tokio::task::AbortHandle>>>>);

impl Default for Connections {
    fn default() -> Connections {
        Connections(Arc::new(std::sync::Mutex::new(Some(Vec::new()))))
    }
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Vec<tokio::task::AbortHandle>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds `task`, forgetting those that ended; aborts it if the call
    /// has ended already (a request's task may get its response just
    /// as its call ends).
    fn push(&self, task: tokio::task::AbortHandle) {
        match self.lock().as_mut() {
            Some(tasks) => {
                tasks.retain(|t| !t.is_finished());
                tasks.push(task);
            }
            None => task.abort(),
        }
    }

    /// Aborts every task, and any added later.
    fn end(&self) {
        for task in self.lock().take().into_iter().flatten() {
            task.abort();
        }
    }
}

impl HttpHooks {
    fn plugin(&self) -> &str {
        self.plugin.as_deref().unwrap_or("")
    }
}

/// What the hook returns: the response and the connection's own future.
type Sent = Result<
    (
        http::Response<WasiBody>,
        Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ),
    HttpError,
>;

impl WasiHttpHooks for HttpHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        let uri = request.uri();
        // Its user information (a password, perhaps) is never shown: the
        // request is refused for it anyway.
        let authority = uri.authority().map_or(String::new(), |a| {
            let a = a.as_str();
            a.rsplit_once('@').map_or(a.to_string(), |(_, host)| {
                format!("<user information>@{host}")
            })
        });
        let plugin = self.plugin.clone().unwrap_or_else(|| Arc::from(""));
        let granted = self
            .grant
            .as_ref()
            .and_then(|g| Some((g, g.entry_for(uri)?.to_string())));
        let Some((grant, entry)) = granted else {
            if self.denied == 0 {
                tracing::debug!(target: "callme::plugin", plugin = &*plugin, %authority, "http request denied (further denials in this call are not logged)");
            }
            self.denied = self.denied.saturating_add(1);
            observe::plugin_http_request(&plugin, "_not_allowed", "denied", None);
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        };
        if self.sent >= grant.max_requests {
            if self.denied == 0 {
                tracing::debug!(target: "callme::plugin", plugin = &*plugin, %authority, max = grant.max_requests, "http request over the call's limit (further refusals in this call are not logged)");
            }
            self.denied = self.denied.saturating_add(1);
            observe::plugin_http_request(&plugin, &entry, "limit", None);
            return Box::new(async { Err(HttpError::ConnectionLimitReached) });
        }
        self.sent += 1;
        let (cap, timeout) = (grant.max_response_bytes, grant.timeout);
        tracing::debug!(target: "callme::plugin", plugin = &*plugin, %authority, "http request");
        let heads = self.heads.clone();
        let sent = io_runtime().map(|io| {
            let connections = self.connections.clone();
            let (task, sent) = run_on(
                io,
                send(
                    io.clone(),
                    plugin.clone(),
                    request,
                    options,
                    Limits {
                        cap,
                        timeout,
                        heads,
                    },
                    connections,
                ),
            );
            self.running.retain(|t| !t.is_finished());
            self.running.push(task);
            sent
        });
        let counted = Counted {
            plugin,
            entry,
            started: Instant::now(),
            outcome: None,
        };
        Box::new(async move {
            let result = async { sent?.await? }.await;
            counted.ended(match &result {
                Ok(_) => "ok",
                Err(
                    HttpError::HttpResponseTimeout
                    | HttpError::ConnectionTimeout
                    | HttpError::ConnectionReadTimeout,
                ) => "timeout",
                Err(
                    HttpError::HttpResponseBodySize(_)
                    | HttpError::HttpResponseHeaderSectionSize(_),
                ) => "too_large",
                Err(HttpError::ConnectionLimitReached) => "limit",
                Err(_) => "error",
            });
            result
        })
    }

    // One chunk waits for the connection while the guest writes the next.
    fn p2_outgoing_body_buffer_chunks(&mut self) -> usize {
        1
    }

    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        if self.grant.is_some() {
            BODY_CHUNK_GRANTED
        } else {
            BODY_CHUNK_NOT_GRANTED
        }
    }

    // The crate logs these as warnings; they are what a guest's server
    // did, not the host's trouble.
    fn p2_error_from_hyper(&mut self, err: &hyper::Error) -> ErrorCode {
        tracing::debug!(target: "callme::plugin", plugin = self.plugin(), error = %err, "http request failed");
        ErrorCode::HttpProtocolError
    }

    fn p2_error_from_connect(&mut self, err: &std::io::Error) -> ErrorCode {
        tracing::debug!(target: "callme::plugin", plugin = self.plugin(), error = %err, "http connect failed");
        ErrorCode::ConnectionRefused
    }

    fn p2_error_from_tls(&mut self, err: &std::io::Error) -> ErrorCode {
        tracing::debug!(target: "callme::plugin", plugin = self.plugin(), error = %err, "http tls failed");
        ErrorCode::TlsProtocolError
    }
}

/// An allowed request, counted in the metrics when it ends: with its
/// outcome, or as `cancelled` when dropped before it has one.
struct Counted {
    plugin: Arc<str>,
    entry: String,
    started: Instant,
    outcome: Option<&'static str>,
}

impl Counted {
    fn ended(mut self, outcome: &'static str) {
        self.outcome = Some(outcome);
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        let outcome = self.outcome.unwrap_or("cancelled");
        let elapsed = self.started.elapsed();
        observe::plugin_http_request(&self.plugin, &self.entry, outcome, Some(elapsed));
    }
}

/// The runtime requests run on, started on first use.
///
/// # Errors
///
/// [`HttpError::InternalError`] when it cannot be started.
fn io_runtime() -> Result<&'static tokio::runtime::Handle, HttpError> {
    static RUNTIME: OnceLock<Option<tokio::runtime::Runtime>> = OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| {
        let built = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("callme-http")
            // Its threads (one worker, and up to 256 looking names up)
            // never read a broker message: the default stack, not the
            // larger one `callme` gives the others (`thread_stack_to_set`).
            .thread_stack_size(2 << 20)
            .enable_all()
            .build();
        built
            .inspect_err(|e| {
                tracing::error!(target: "callme::plugin", error = %e, "cannot start the runtime of outbound HTTP: every request fails");
            })
            .ok()
    });
    runtime
        .as_ref()
        .map(tokio::runtime::Runtime::handle)
        .ok_or_else(|| {
            HttpError::InternalError(Some("outbound HTTP is unavailable on this host".into()))
        })
}

/// Runs `future` on `io`: its task, and its outcome; dropping the
/// outcome's future stops the task, and so does aborting it.
fn run_on<T: Send + 'static>(
    io: &tokio::runtime::Handle,
    future: impl Future<Output = T> + Send + 'static,
) -> (
    tokio::task::AbortHandle,
    impl Future<Output = Result<T, HttpError>> + Send + 'static,
) {
    /// Aborts the task when the request is dropped.
    struct Abort(tokio::task::AbortHandle);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let task = io.spawn(future);
    let handle = task.abort_handle();
    let abort = Abort(task.abort_handle());
    let outcome = async move {
        let _abort = abort;
        task.await
            .map_err(|e| HttpError::InternalError(Some(format!("the request's task failed: {e}"))))
    };
    (handle, outcome)
}

/// What bounds a response past its head.
struct Limits {
    /// The most bytes its body may hold.
    cap: u64,
    /// Time from the request until its last byte.
    timeout: Duration,
    /// Where its head and trailers count.
    heads: Heads,
}

/// Sends an allowed request on `io`: at most `timeout` until the last
/// byte of the response, a body of at most `cap` bytes, trailers counted
/// with the call's heads. The response's connection goes into
/// `connections`, to end with the call.
async fn send(
    io: tokio::runtime::Handle,
    plugin: Arc<str>,
    request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
    limits: Limits,
    connections: Connections,
) -> Sent {
    let Limits {
        cap,
        timeout,
        heads,
    } = limits;
    let deadline = tokio::time::Instant::now() + timeout;
    let between_bytes = options.and_then(|o| o.between_bytes_timeout);
    let sent = tokio::time::timeout_at(deadline, send::send(&plugin, request, options)).await;
    let (mut response, connection) = sent.map_err(|_| HttpError::HttpResponseTimeout)??;
    let length = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(length) = length.filter(|&n| n > cap) {
        return Err(HttpError::HttpResponseBodySize(Some(length)));
    }
    let held = heads.take(&mut response)?;
    let response = response.map(|body| {
        CappedBody {
            inner: body,
            received: 0,
            cap,
            heads,
            held,
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            between_bytes: between_bytes.map(|gap| (gap, Box::pin(tokio::time::sleep(gap)))),
            done: false,
        }
        .boxed_unsync()
    });
    // The connection ends with the time limit too, whether or not the
    // guest reads the body; a moment after it, so that a body still
    // coming fails with the timeout, not with a connection closed.
    let (task, connection) = run_on(&io, async move {
        tokio::time::timeout_at(deadline + CONNECTION_GRACE, connection)
            .await
            .unwrap_or(Ok(()))
    });
    connections.push(task);
    // wasmtime-wasi-http logs any error this gives back as a warning, of
    // no plugin, past every log budget: one per response a call leaves
    // unread (its connection ends with the call) would reach the log at
    // the rate calls come. The host's own, at debug level, names it.
    let ended = async move {
        if let Ok(Err(e)) | Err(e) = connection.await {
            tracing::debug!(target: "callme::plugin", plugin = &*plugin, error = %e, "http connection ended");
        }
        Ok(())
    };
    Ok((response, Box::new(ended)))
}

/// A response body that fails once it passes `cap` bytes or its deadline,
/// or once its trailers pass what the call may still receive in heads.
struct CappedBody {
    inner: WasiBody,
    received: u64,
    cap: u64,
    /// The call's and the instance's heads, which its trailers count with:
    /// the guest may keep them as long as it keeps the body's handle.
    heads: Heads,
    /// What its head counted beyond its headers, for the part of the body
    /// read with it (which keeps hyper's read buffer): given back once
    /// the first frame is taken (its data copied out of that buffer), or
    /// the body dropped.
    held: usize,
    deadline: Pin<Box<tokio::time::Sleep>>,
    /// The longest wait the guest accepts between two frames, and the
    /// timer of the current wait.
    between_bytes: Option<(Duration, Pin<Box<tokio::time::Sleep>>)>,
    /// Failed: nothing more comes.
    done: bool,
}

impl Body for CappedBody {
    type Data = Bytes;
    type Error = HttpError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, HttpError>>> {
        if self.done {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_ready() && self.held > 0 {
            let held = std::mem::take(&mut self.held);
            self.heads.give_back(held);
        }
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_trailers() {
                    Ok(mut trailers) => {
                        if let Err(e) = self.heads.take_trailers(&mut trailers) {
                            self.done = true;
                            return Poll::Ready(Some(Err(e)));
                        }
                        Frame::trailers(trailers)
                    }
                    // Its own copy: hyper's frames are slices of its read
                    // buffer, which one the guest holds unread would keep
                    // whole.
                    Err(frame) => frame.map_data(|data| Bytes::copy_from_slice(&data)),
                };
                let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                self.received = self.received.saturating_add(len);
                if self.received > self.cap {
                    self.done = true;
                    return Poll::Ready(Some(Err(HttpError::HttpResponseBodySize(Some(
                        self.received,
                    )))));
                }
                if let Some((gap, timer)) = self.between_bytes.as_mut() {
                    let next = tokio::time::Instant::now() + *gap;
                    timer.as_mut().reset(next);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    self.done = true;
                    return Poll::Ready(Some(Err(HttpError::HttpResponseTimeout)));
                }
                if let Some((_, timer)) = self.between_bytes.as_mut()
                    && timer.as_mut().poll(cx).is_ready()
                {
                    self.done = true;
                    return Poll::Ready(Some(Err(HttpError::ConnectionReadTimeout)));
                }
                Poll::Pending
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for CappedBody {
    fn drop(&mut self) {
        self.heads.give_back(self.held);
    }
}

impl WasiHttpView for CallState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        let http = &mut self.caps.http;
        http.hooks.plugin.get_or_insert_with(|| self.plugin.clone());
        WasiHttpCtxView {
            ctx: &mut http.ctx,
            table: &mut self.table,
            hooks: &mut http.hooks,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(hosts: &[&str]) -> HttpGrant {
        HttpGrant::new(hosts, DEFAULT_HTTP_MAX_RESPONSE_BYTES, DEFAULT_HTTP_TIMEOUT).unwrap()
    }

    #[test]
    fn requests_are_allowed_by_host_and_port_only() {
        let g = grant(&["127.0.0.1:8080", "API.example.com:443", "[::1]:9000"]);
        let allows = |uri: &str| g.entry_for(&uri.parse::<Uri>().unwrap()).is_some();
        assert_eq!(
            g.entry_for(&"https://API.example.com/v1".parse::<Uri>().unwrap()),
            Some("api.example.com:443")
        );
        assert!(allows("http://127.0.0.1:8080/x?y=1"));
        assert!(allows("https://api.example.com/v1"));
        assert!(allows("http://api.example.com:443/"));
        assert!(allows("http://[::1]:9000/"));
        assert!(!allows("http://127.0.0.1:8081/"));
        assert!(!allows("http://api.example.com/"), "port 80 is not granted");
        assert!(!allows("https://evil.example.com/"));
        assert!(!allows("http://127.0.0.1.nip.io:8080/"));
        assert!(!allows("/no/authority"));
        assert!(!allows("http://token@127.0.0.1:8080/"));
        assert!(!allows("https://user:pw@api.example.com/v1"));
        assert!(!HttpGrant::default().allows("127.0.0.1", 8080));
        assert!(!HttpGrant::default().is_granted());
        assert_eq!(
            g.hosts().collect::<Vec<_>>(),
            ["127.0.0.1:8080", "[::1]:9000", "api.example.com:443"]
        );
    }

    #[test]
    fn entries_must_name_a_host_and_a_port() {
        for entry in [
            "api.example.com",
            "https://api.example.com:443",
            "user:pw@host:80",
            ":80",
            "host:0",
            "host:99999",
            "",
            "host:80/path",
            "*.example.com:443",
            "*:443",
            "api?.example.com:443",
        ] {
            let e = HttpGrant::new([entry], 1, DEFAULT_HTTP_TIMEOUT).unwrap_err();
            assert!(e.to_string().contains("is not HOST:PORT"), "{entry}: {e}");
        }
    }
}
