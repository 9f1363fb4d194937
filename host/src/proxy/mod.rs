//! The proxy: calls functions of servers by id, over one shared connection.
//!
//! A [`Proxy`] declares its own reply exchange and queue
//! (`client_USER_ex_UUID`, `client_USER_queue_UUID`), publishes requests to
//! `server_ID_ex` with publisher confirms and `mandatory` set, and matches
//! replies to calls by correlation id. Requests also name the reply queue,
//! so a busy server can pipeline its replies there (see
//! `docs/protocol.md`, "Pipelined replies"). Many tasks share one proxy; calls
//! are multiplexed on its connection. A request nobody can route fails at
//! once with [`Error::NoSuchServer`]; a reply that arrives after its call
//! timed out is dropped. When the broker connection is lost, calls
//! waiting for replies fail at once with [`Error::Disconnected`]; the proxy
//! reconnects, declares a reply queue under a new name, and calls made
//! meanwhile wait for that within their timeouts. A connection lost to a
//! reply the AMQP client cannot read fails no call waiting: the reply
//! queue outlives it, and their replies are taken from it (by a proxy
//! that reconnects, as by default: one with
//! [`ConnectOptions::auto_recover`] off is closed by any loss, this one
//! too, and fails every call). Every
//! request carries a W3C `traceparent`: the caller's trace when it gives
//! one ([`ServerProxy::with_trace`], [`CallOptions::trace`]), a new trace
//! otherwise.
//!
//! - `pending`: calls waiting for replies, by correlation id;
//! - `replies`: the reply queue and its consumer, across reconnections;
//! - `unreadable`: the replies left in a reply queue whose connection an
//!   unreadable reply ended;
//! - `blocking`: [`BlockingProxy`], for code that is not async.

mod blocking;
mod pending;
mod replies;
mod unreadable;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::watch;
use tracing::debug;

pub use blocking::BlockingProxy;
use pending::Pending;
use replies::{Replies, ReplyNames};

use crate::amqp::echo::Echo;
use crate::amqp::link::State;
use crate::amqp::publisher::{Published, Publisher};
use crate::amqp::{ConnectOptions, Link, resubscribe, topology};
use crate::protocol::{
    Args, CALL_DEPTH, CONTENT_TYPE, DESCRIBE, REPLY_QUEUE, Request, TIMESTAMP_IN_MS,
    is_valid_server_id, server_exchange, shown_id,
};
use crate::{Error, TraceContext, TraceId};

/// How one call is made.
#[derive(Debug, Clone)]
pub struct CallOptions {
    /// How long to wait for the reply, over every attempt.
    pub timeout: Duration,
    /// Send the call again when the connection was lost before its reply
    /// (see [`Proxy::call_with`]). Off by default.
    pub retry: bool,
    /// The caller's current trace: the request's `traceparent` (and
    /// `tracestate`) continue it. `None` (the default): the call starts a
    /// new trace.
    pub trace: Option<TraceContext>,
    /// Hops from the client that started the chain of calls, sent in the
    /// `x-callme-depth` header; `None` (the default): a client's call.
    pub depth: Option<u32>,
}

impl CallOptions {
    /// A call waiting `timeout` for its reply, sent once, starting a new trace.
    pub fn new(timeout: Duration) -> CallOptions {
        CallOptions {
            timeout,
            retry: false,
            trace: None,
            depth: None,
        }
    }

    /// The same call, made `depth` hops from the client that started the
    /// chain (a plugin calling on while serving a request).
    pub fn with_depth(mut self, depth: u32) -> CallOptions {
        self.depth = Some(depth);
        self
    }

    /// The same call, continuing the trace `trace`.
    pub fn with_trace(mut self, trace: TraceContext) -> CallOptions {
        self.trace = Some(trace);
        self
    }
}

/// One call, across its attempts.
struct Call<'a> {
    server: &'a str,
    /// The server's exchange, where the request goes.
    exchange: &'a str,
    func: &'a str,
    corr: &'a str,
    body: &'a Arc<[u8]>,
    /// `traceparent` and `tracestate`, the same on every attempt.
    headers: &'a FieldTable,
    trace_id: TraceId,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

/// How one attempt at a call ended.
enum Attempt {
    /// With the call's outcome.
    Done(Result<Value, Error>),
    /// With the connection: the call may be sent again.
    Lost(Error),
    /// Its connection was lost before any of its request was written
    /// (while it waited for a lane, or opened one): it goes on the next
    /// connection, with or without `retry`, since it cannot run twice.
    NotSent(Error),
}

/// Why a request was not confirmed.
enum Unsent {
    /// Its connection was lost before any of it was written.
    NotWritten(Error),
    /// It failed, written or not.
    Failed(Error),
}

/// The pause before a call is sent again.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// The longest pause between two tries of one call: the pause doubles
/// with each try, so a broker refusing the request (a queue at its length
/// limit, deploy.md) gets a few tries a second from it, not twenty.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(2);

/// Requests one proxy has on their way to the broker at once (each on a
/// channel of its own until confirmed); more wait for a free channel.
const PUBLISH_LANES: usize = 64;

/// The seed's default: a call waits this long for its reply.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest reply body a [`Proxy`] takes unless told otherwise
/// ([`Proxy::set_max_reply_bytes`]): 16 MiB, a plugin's largest result
/// by default and RabbitMQ 4.x's default `max_message_size`. Its JSON may
/// also hold only so many objects and arrays (one per 32 bytes of the
/// limit), so that no reply takes the caller much more memory to parse
/// than a few hundred megabytes.
pub const DEFAULT_MAX_REPLY_BYTES: usize = 16 << 20;

/// Largest request body a [`Proxy`] sends unless told otherwise
/// ([`Proxy::set_max_request_bytes`]): 16 MiB, RabbitMQ 4.x's default
/// `max_message_size`. A larger request is refused before it is sent:
/// its frames would hold up every other request and acknowledgement on
/// the proxy's connection while they are written, for the broker (or the
/// server, whose own limit is 4 MiB by default) to refuse it after.
pub const DEFAULT_MAX_PROXY_REQUEST_BYTES: usize = 16 << 20;

/// The longest a call waits: longer timeouts (up to `Duration::MAX`) are
/// taken as this, a hundred years.
const MAX_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// A client of callme servers. Cheap to clone; clones share the connection.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

struct Inner {
    /// Its connection, which closes when the proxy is dropped (or when a
    /// server owning it closes it, `Proxy::close`).
    link: Link,
    /// The connection the reply queue is consumed on, while there is one,
    /// and the reply names declared on it.
    ready: watch::Receiver<replies::Ready>,
    /// The channels requests are published on, one request per channel
    /// at a time, so a request to a missing server costs no other call.
    publisher: Arc<Publisher>,
    pending: Arc<Pending>,
    timeout: Duration,
    /// The largest reply taken, in bytes, held to the JSON objects and
    /// arrays a request of that size may hold: otherwise any server called
    /// could make the caller parse a reply of the broker's largest message
    /// size into many times that in memory, costing every other caller of
    /// the process. [`DEFAULT_MAX_REPLY_BYTES`] for a program's proxy, the
    /// request limit for the calls a server's plugins make.
    reply_limit: AtomicUsize,
    /// The largest request sent, in bytes.
    request_limit: AtomicUsize,
    /// Whether this proxy makes a server's plugins' calls (which names the
    /// limit a refused reply broke).
    for_plugins: bool,
    /// Which server ids the broker can name in an error this proxy can
    /// read: only those are called.
    echo: Echo,
    /// Where calls are counted, once the program gives a registry.
    #[cfg(feature = "metrics")]
    metrics: std::sync::OnceLock<crate::observe::ClientMetrics>,
}

impl Proxy {
    /// Connects to the broker at `uri` (plain AMQP or TLS without client
    /// certificate) with the default timeout. The proxy reconnects by
    /// itself when the broker comes back after an outage.
    ///
    /// # Errors
    ///
    /// [`Error::Connection`], [`Error::AccessRefused`] or [`Error::Config`]
    /// when the broker cannot be reached, refuses, or the URI is invalid.
    pub async fn connect(uri: &str) -> Result<Proxy, Error> {
        Proxy::connect_with(&ConnectOptions::new(uri), DEFAULT_TIMEOUT).await
    }

    /// Connects with full options and a default timeout for every call.
    ///
    /// # Errors
    ///
    /// As [`Proxy::connect`].
    pub async fn connect_with(options: &ConnectOptions, timeout: Duration) -> Result<Proxy, Error> {
        let uri = options.parse()?;
        let user = options.user(&uri);
        let link = Link::connect(options, "callme proxy").await?;
        let (conn, state) = (link.current(), link.subscribe());
        let proxy =
            Proxy::start(link, conn, state, &user, timeout, None, Echo::of(options)).await?;
        debug!(target: "callme::proxy", broker = %options.redacted(), reply_exchange = %proxy.reply_exchange(), "proxy ready");
        Ok(proxy)
    }

    /// A proxy over `link`, a connection its owner opened for it (a
    /// server's, for the calls its plugins make), as AMQP user `user`.
    #[cfg(feature = "server")]
    pub(crate) async fn over(
        link: Link,
        user: &str,
        echo: Echo,
        timeout: Duration,
    ) -> Result<Proxy, Error> {
        let (conn, state) = (link.current(), link.subscribe());
        let limit = Some(crate::protocol::DEFAULT_MAX_REQUEST_BYTES);
        Proxy::start(link, conn, state, user, timeout, limit, echo).await
    }

    /// Declares the reply queue on `conn`, the link's connection, and
    /// starts consuming it, across the link's reconnections (`state`).
    async fn start(
        owned: Link,
        conn: Option<Arc<Connection>>,
        state: watch::Receiver<State>,
        user: &str,
        timeout: Duration,
        reply_limit: Option<usize>,
        echo: Echo,
    ) -> Result<Proxy, Error> {
        // AMQP names are at most 255 bytes; the reply queue's name carries
        // the user's.
        let names = ReplyNames::new(user);
        let longest = names.queue.len();
        if longest > 255 {
            return Err(Error::Config(format!(
                "the broker user name is {} bytes: callme's reply names \
                 (client_USER_queue_ID) must fit AMQP's 255 bytes, so it may have at most {}",
                user.len(),
                user.len() - (longest - 255)
            )));
        }
        let names = Arc::new(names);
        let conn = conn
            .ok_or_else(|| Error::Disconnected("the broker connection was lost at once".into()))?;
        let (channel, consumer) = names.declare(&conn).await?;
        let pending = Arc::new(Pending::default());
        // No more lanes than the connection may have channels: besides
        // the connection's own and the reply consumer's, a few for lanes
        // still closing (a broker or URI `channel_max` of 8 leaves 4).
        let lanes = usize::from(conn.configuration().channel_max())
            .saturating_sub(4)
            .clamp(1, PUBLISH_LANES);
        let (ready_tx, ready) = watch::channel((Some(conn.clone()), names.clone(), None));
        let replies = Replies {
            user: user.to_string(),
            names,
            served: false,
            pending: pending.clone(),
            ready: ready_tx,
            connect: owned.options().clone(),
            draining: false,
            drains: Arc::new(tokio::sync::Semaphore::new(unreadable::MAX_DRAINS)),
        };
        tokio::spawn(resubscribe::run(replies, state, (conn, channel, consumer)));
        Ok(Proxy {
            inner: Arc::new(Inner {
                link: owned,
                ready,
                publisher: Arc::new(Publisher::new(lanes)),
                pending,
                timeout,
                reply_limit: AtomicUsize::new(reply_limit.unwrap_or(DEFAULT_MAX_REPLY_BYTES)),
                request_limit: AtomicUsize::new(DEFAULT_MAX_PROXY_REQUEST_BYTES),
                for_plugins: reply_limit.is_some(),
                echo,
                #[cfg(feature = "metrics")]
                metrics: std::sync::OnceLock::new(),
            }),
        })
    }

    /// Counts this proxy's calls in `registry` from now on:
    /// `callme_client_calls_total` (by `server_id`, `function` and
    /// `outcome`) and `callme_client_call_duration_seconds` (by
    /// `server_id` and `function`). The registry is the program's own,
    /// served with its other metrics (see `docs/operations.md`); the
    /// function names are the program's, so they are as bounded as its
    /// code makes them. A second registry given to the same proxy is
    /// ignored: give each proxy its own registry, or a sub-registry with a
    /// label of its own ([`Registry::sub_registry_with_label`]). Feature
    /// `metrics` (on with `server`).
    ///
    /// [`Registry::sub_registry_with_label`]: crate::observe::Registry::sub_registry_with_label
    #[cfg(feature = "metrics")]
    pub fn register_metrics(&self, registry: &mut crate::observe::Registry) {
        if self.inner.metrics.get().is_none() {
            let _ = self
                .inner
                .metrics
                .set(crate::observe::ClientMetrics::register(registry));
        }
    }

    /// A call of `func` on `server` started now, to be recorded in the
    /// proxy's metrics (when it has them) as it ends.
    fn recorded<'a>(&'a self, server: &'a str, func: &'a str) -> Recorded<'a> {
        Recorded {
            proxy: self,
            server,
            func,
            started: tokio::time::Instant::now(),
            ended: false,
        }
    }

    /// Closes its connection now, telling the broker (which otherwise logs
    /// a connection closed under it), and stops reconnecting; calls still
    /// waiting fail with [`Error::Disconnected`], calls made after with
    /// [`Error::BrokerLost`]. Every clone shares the connection, so it is
    /// closed for them too. Its reply queue is deleted first, if the proxy
    /// is connected (waiting at most a second for it). Dropping the last
    /// clone closes the connection as
    /// well, without waiting for the broker's word, and leaves the reply
    /// queue for the broker to delete once unused for 30 s.
    pub async fn close(&self) {
        if let Some(conn) = self.inner.link.current()
            && conn.status().connected()
        {
            let queue = self.inner.ready.borrow().1.queue.clone();
            let delete = topology::delete_reply(&conn, &queue);
            let _ = tokio::time::timeout(replies::DELETE_WITHIN, delete).await;
        }
        self.inner.link.close().await;
    }

    /// A handle on the server `server_id` (the seed's `use_server`).
    pub fn use_server(&self, server_id: &str) -> ServerProxy {
        ServerProxy {
            proxy: self.clone(),
            server: server_id.to_string(),
            options: CallOptions::new(self.inner.timeout),
        }
    }

    /// Sets the largest reply body this proxy and its clones take, in
    /// bytes ([`DEFAULT_MAX_REPLY_BYTES`] unless set), for the calls made
    /// from now on. A larger reply, or one holding more JSON objects and
    /// arrays than one per 32 bytes of the limit, is not parsed: its call
    /// fails with an `Internal` [`Error::Remote`] saying which limit it
    /// broke, and the other calls go on. Raise it for a server known to
    /// answer more (a plugin whose `result_bytes` is raised, on a broker
    /// whose `max_message_size` allows it).
    pub fn set_max_reply_bytes(&self, max: usize) {
        self.inner.reply_limit.store(max, Ordering::Relaxed);
    }

    /// The largest reply body this proxy takes, in bytes.
    pub fn max_reply_bytes(&self) -> usize {
        self.inner.reply_limit.load(Ordering::Relaxed)
    }

    /// Sets the largest request body this proxy and its clones send, in
    /// bytes ([`DEFAULT_MAX_PROXY_REQUEST_BYTES`] unless set), for the
    /// calls made from now on. A call with a larger request fails with
    /// [`Error::TooLarge`] before anything is sent. Raise it for a server
    /// whose `max_request_bytes` is raised, on a broker whose
    /// `max_message_size` allows it.
    pub fn set_max_request_bytes(&self, max: usize) {
        self.inner.request_limit.store(max, Ordering::Relaxed);
    }

    /// The largest request body this proxy sends, in bytes.
    pub fn max_request_bytes(&self) -> usize {
        self.inner.request_limit.load(Ordering::Relaxed)
    }

    /// The timeout of calls that do not give one.
    pub(crate) fn default_timeout(&self) -> Duration {
        self.inner.timeout
    }

    /// The exchange this proxy receives replies on: named anew on each
    /// connection to the broker (this is the current one's, or the last
    /// one's while it reconnects).
    pub fn reply_exchange(&self) -> String {
        self.inner.ready.borrow().1.exchange.clone()
    }

    /// Calls `func` on `server` with `args`, waiting at most `timeout`.
    ///
    /// While the broker connection is being re-established, the call
    /// waits for it within its timeout.
    ///
    /// # Errors
    ///
    /// [`Error::Timeout`], [`Error::NoSuchServer`], [`Error::AccessRefused`],
    /// [`Error::Remote`] (the server's error), [`Error::Disconnected`] (the
    /// connection lost, or down for the whole timeout),
    /// [`Error::Connection`], [`Error::BrokerLost`] (closed for good: no
    /// reconnection), [`Error::Rejected`], [`Error::TooLarge`], or
    /// [`Error::Config`] for a server id that cannot be one.
    pub async fn call(
        &self,
        server: &str,
        func: &str,
        args: Args,
        timeout: Duration,
    ) -> Result<Value, Error> {
        self.call_with(server, func, args, CallOptions::new(timeout))
            .await
    }

    /// Calls `func` on `server` with `args`, as `options` say.
    ///
    /// With `retry`, a call whose reply was lost with the connection
    /// ([`Error::Disconnected`]), whose request may not have reached the
    /// broker ([`Error::Connection`]), or whose request the broker refused
    /// ([`Error::Rejected`]: a quorum queue nacks publishes for a moment
    /// after its leader's node is lost), is sent again once the connection is
    /// back, within the same timeout and under the same correlation id, so
    /// the first reply to come is the one kept. The function may then run
    /// twice: fine for a plugin that has no effect outside its sandbox
    /// (a fresh one per call), for one granted `rpc` or `allowed_hosts`
    /// and for native functions only if they are idempotent. Every attempt carries the
    /// same `traceparent`.
    ///
    /// Without `retry` too, a call whose connection is lost before any of
    /// its request was written (while it waited for a publish lane, or
    /// opened one) waits for the next connection and is sent there,
    /// within its timeout: it cannot run twice.
    ///
    /// # Errors
    ///
    /// As [`Proxy::call`].
    pub async fn call_with(
        &self,
        server: &str,
        func: &str,
        args: Args,
        options: CallOptions,
    ) -> Result<Value, Error> {
        if !is_valid_server_id(server) {
            return Err(Error::Config(format!(
                "invalid server id `{}`: 1 to 200 letters, digits, `-`, `_` and `.`",
                shown_id(server)
            )));
        }
        let exchange = server_exchange(server);
        if !self.inner.echo.readable(&exchange) {
            // The broker names the exchange, the vhost and the user in an
            // error about a publish, and cuts it at 252 bytes whatever
            // character that splits: the connection, every call on it,
            // would end for a text lapin cannot read.
            return Err(Error::Config(format!(
                "server id `{server}` is too long to call as this proxy's user on its vhost \
                 ({} bytes): with a vhost or user name that is not ASCII, an error of the \
                 broker about it could be cut in the middle of a character, which would end \
                 the connection",
                server.len()
            )));
        }
        // A timeout of years still ends; one of centuries is taken as
        // "as long as can be" rather than overflow a clock.
        let timeout = options.timeout.min(MAX_TIMEOUT);
        let record = self.recorded(server, func);
        let deadline = record.started + timeout;
        let corr = uuid::Uuid::new_v4().to_string();
        let body: Arc<[u8]> = Request {
            func: func.to_string(),
            args,
        }
        .encode()
        .into();
        let request_limit = self.inner.request_limit.load(Ordering::Relaxed);
        if body.len() > request_limit {
            let e = Error::TooLarge {
                server: server.to_string(),
                reason: format!(
                    "it is {} bytes, over the proxy's limit of {request_limit} \
                     (Proxy::set_max_request_bytes); nothing was sent",
                    body.len()
                ),
            };
            return record.ended(Err(e));
        }
        let trace = match options.trace {
            Some(trace) => trace,
            None => TraceContext::new_trace(),
        };
        let mut headers = trace.headers();
        if let Some(depth) = options.depth {
            headers.insert(CALL_DEPTH.into(), AMQPValue::LongUInt(depth));
        }
        let call = Call {
            server,
            exchange: &exchange,
            func,
            corr: &corr,
            body: &body,
            headers: &headers,
            trace_id: trace.trace_id(),
            deadline,
            timeout,
        };
        let mut pause = RETRY_PAUSE;
        loop {
            match self.attempt(&call).await {
                Attempt::Done(outcome) => return record.ended(outcome),
                Attempt::NotSent(e) => {
                    // `ready` waits for the next connection (the lost one
                    // is no longer connected), within the call's time.
                    debug!(target: "callme::proxy", server, func, correlation_id = %corr, trace_id = %call.trace_id, error = %e, "not sent: waiting for the next connection");
                }
                Attempt::Lost(e) => {
                    if !options.retry || tokio::time::Instant::now() >= deadline {
                        return record.ended(Err(e));
                    }
                    debug!(target: "callme::proxy", server, func, correlation_id = %corr, trace_id = %call.trace_id, error = %e, ?pause, "sending again");
                    // Give the link a moment to notice a dead connection,
                    // and a broker refusing the request (a full queue) a
                    // longer one each time, within the call's time.
                    tokio::time::sleep_until((tokio::time::Instant::now() + pause).min(deadline))
                        .await;
                    pause = (pause * 2).min(MAX_RETRY_PAUSE);
                    // Out of time while pausing: the call ends with what
                    // it was lost to, not a timeout of its own.
                    if tokio::time::Instant::now() >= deadline {
                        return record.ended(Err(e));
                    }
                }
            }
        }
    }

    /// Sends a call once and waits for its reply; nothing is sent once
    /// the call's time is up.
    async fn attempt(&self, call: &Call<'_>) -> Attempt {
        let timed_out = || {
            Attempt::Done(Err(Error::Timeout {
                server: call.server.to_string(),
                timeout: call.timeout,
            }))
        };
        if tokio::time::Instant::now() >= call.deadline {
            return timed_out();
        }
        let (conn, names) = match self.ready(call.deadline, call.timeout).await {
            Ok(conn) => conn,
            Err(e) => return Attempt::Done(Err(e)),
        };
        // Ready only as the deadline passed: nobody would wait for it.
        let left = call
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return timed_out();
        }
        let (_waiting, rx) = self.inner.pending.wait(call.corr, &names);
        // Wait for the publisher confirm and the reply together: the
        // confirm tells an unroutable request (no server) at once, and the
        // reply needs no confirm to be trusted, so neither adds latency.
        let claimed = Arc::new(AtomicBool::new(false));
        let mut publish = self.send_request(conn, names, call, claimed.clone());
        let mut rx = rx;
        let mut confirmed = false;
        let outcome = tokio::time::timeout_at(call.deadline, async {
            loop {
                tokio::select! {
                    sent = &mut publish, if !confirmed => {
                        match sent {
                            Ok(Ok(())) => confirmed = true,
                            Ok(Err(Unsent::NotWritten(e))) => return Attempt::NotSent(e),
                            Ok(Err(Unsent::Failed(e @ (Error::Connection(_) | Error::Rejected { .. })))) => return Attempt::Lost(e),
                            Ok(Err(Unsent::Failed(e))) => return Attempt::Done(Err(e)),
                            // Given up unsent: the call's time ran out
                            // while it waited for a lane.
                            Err(_) => return timed_out(),
                        }
                        debug!(target: "callme::proxy", server = call.server, func = call.func, correlation_id = %call.corr, trace_id = %call.trace_id, "request confirmed");
                    }
                    reply = &mut rx => {
                        return match reply {
                            Ok(body) => Attempt::Done(self.read_reply(&body).into_result().map_err(Error::Remote)),
                            // Lost before its request task began writing
                            // it (it waits for a lane, say): taken from the
                            // task, to be sent on the next connection.
                            Err(_) if !confirmed && !claimed.swap(true, Ordering::AcqRel) => Attempt::NotSent(Error::Disconnected(
                                "the connection was lost before the request was sent".into(),
                            )),
                            Err(_) => Attempt::Lost(Error::Disconnected(
                                "the connection to the broker was lost before the reply came".into(),
                            )),
                        };
                    }
                }
            }
        })
        .await;
        outcome.unwrap_or_else(|_| timed_out())
    }

    /// A reply's body as a response, within the proxy's reply limit.
    fn read_reply(&self, body: &[u8]) -> crate::protocol::Response {
        let limit = self.inner.reply_limit.load(Ordering::Relaxed);
        let whose = if self.inner.for_plugins {
            "the limit of replies to plugins' calls"
        } else {
            "the proxy's limit, Proxy::set_max_reply_bytes"
        };
        replies::read(body, limit, whose)
    }

    /// The connection the reply queue is consumed on, and the names of
    /// the reply exchange and queue on it, waiting for one until
    /// `deadline` while the link is re-established.
    async fn ready(
        &self,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<(Arc<Connection>, Arc<ReplyNames>), Error> {
        let mut ready = self.inner.ready.clone();
        // A connection the broker dropped stays in `ready` until the link
        // has noticed (within 250 ms): publishing on it would fail the
        // call at once, so wait for the link's next word instead.
        let wait = tokio::time::timeout_at(
            deadline,
            ready.wait_for(|(conn, _, refused)| {
                refused.is_some() || conn.as_ref().is_some_and(|c| c.status().connected())
            }),
        );
        match wait.await {
            // Closed since (the proxy closed): no refusal stands.
            Ok(Ok(_)) if self.inner.link.is_closed() => Err(Error::BrokerLost),
            Ok(Ok(ready)) => match &*ready {
                (_, _, Some(refused)) => Err(Error::AccessRefused(format!(
                    "the proxy cannot declare its reply queue again: {refused}"
                ))),
                (conn, names, None) => Ok((
                    conn.clone().expect("waited for a connection"),
                    names.clone(),
                )),
            },
            // Closed for good (reconnection off, or the proxy closed): not
            // a state that passes, so not `Disconnected`, which callers
            // may wait out.
            Ok(Err(_)) => Err(Error::BrokerLost),
            Err(_) => Err(Error::Disconnected(format!(
                "no connection to the broker within the call's timeout of {timeout:?} (reconnecting)"
            ))),
        }
    }

    /// Publishes `call`'s request on `conn`, with `names` to reply to, in a
    /// task of its own; what became of it. The task holds its lane only
    /// while the broker has the request to confirm, however the caller's
    /// future is polled (or not): a caller that stopped polling its call
    /// (a slow stream of calls `buffered`, a `select!` on `&mut call`)
    /// keeps no other call from its lane. Its caller gone, the task
    /// sends nothing if it has no lane yet, and lets its lane go once the
    /// request is written. `claimed` is taken (set) by whichever comes
    /// first: the task, as it begins writing the request, or the call,
    /// as it learns that its connection was lost; a request the call
    /// took is not written, and the call sends it on the next connection.
    fn send_request(
        &self,
        conn: Arc<Connection>,
        names: Arc<ReplyNames>,
        call: &Call<'_>,
        claimed: Arc<AtomicBool>,
    ) -> tokio::sync::oneshot::Receiver<Result<(), Unsent>> {
        let (mut tx, rx) = tokio::sync::oneshot::channel();
        let publisher = self.inner.publisher.clone();
        let server = call.server.to_string();
        let exchange = call.exchange.to_string();
        let corr = call.corr.to_string();
        let headers = call.headers.clone();
        let body = call.body.clone();
        let deadline = call.deadline;
        tokio::spawn(async move {
            let held = tokio::select! {
                biased;
                () = tx.closed() => return,
                held = publisher.hold(&conn, &exchange) => held,
            };
            let held = match held {
                Ok(held) => held,
                Err(e) if !conn.status().connected() => {
                    let _ = tx.send(Err(Unsent::NotWritten(e)));
                    return;
                }
                Err(e) => {
                    let _ = tx.send(Err(Unsent::Failed(e)));
                    return;
                }
            };
            // Its properties once it has a lane: the request expires when
            // its call stops waiting, however long the lane took.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() || tx.is_closed() {
                publisher.put_back(&conn, held);
                return;
            }
            if !conn.status().connected() {
                // Lost while this waited for its lane (the link not told
                // yet): nothing is written.
                let _ = tx.send(Err(Unsent::NotWritten(Error::Disconnected(
                    "the connection was lost before the request was sent".into(),
                ))));
                return;
            }
            if claimed.swap(true, Ordering::AcqRel) {
                // Its call learnt first that the connection was lost.
                return;
            }
            let props = request_properties(&corr, headers, &names, left);
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            let published = publisher
                .send(&conn, held, &exchange, options, &body, props, tx.closed())
                .await;
            let outcome = published.and_then(|published| request_outcome(&server, published));
            let _ = tx.send(outcome.map_err(Unsent::Failed));
        });
        rx
    }
}

/// A request's properties: `corr`, the reply names, `headers` and when it
/// was sent, expiring in `left` (when its call stops waiting: a call sent
/// again has less time left).
fn request_properties(
    corr: &str,
    mut headers: FieldTable,
    names: &ReplyNames,
    left: Duration,
) -> BasicProperties {
    // RabbitMQ takes an `expiration` of at most 2^32 - 1 ms (49.7 days)
    // and refuses the publish beyond: a longer timeout lets the request
    // wait that long in the queue.
    let millis = left.as_millis().clamp(1, u128::from(u32::MAX));
    // When it was sent, for the host's queue wait: the `timestamp`
    // property in seconds, and in milliseconds in a header.
    let sent = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    headers.insert(
        TIMESTAMP_IN_MS.into(),
        AMQPValue::LongLongInt(i64::try_from(sent.as_millis()).unwrap_or(i64::MAX)),
    );
    headers.insert(
        REPLY_QUEUE.into(),
        AMQPValue::LongString(names.queue.as_str().into()),
    );
    BasicProperties::default()
        .with_content_type(CONTENT_TYPE.into())
        .with_correlation_id(corr.into())
        .with_reply_to(names.exchange.as_str().into())
        .with_expiration(millis.to_string().into())
        .with_timestamp(sent.as_secs())
        .with_headers(headers)
}

/// What a request to `server` that was `published` means for its call.
fn request_outcome(server: &str, published: Published) -> Result<(), Error> {
    match published {
        Published::Confirmed => Ok(()),
        // No exchange, or an exchange no queue is bound to: nothing
        // serves that id.
        Published::Returned | Published::NoExchange => Err(Error::NoSuchServer(server.to_string())),
        Published::Nacked => Err(Error::Rejected {
            server: server.to_string(),
        }),
        Published::TooLarge(refusal) => Err(Error::TooLarge {
            server: server.to_string(),
            reason: format!("the broker refused it: {refusal}"),
        }),
        // Nobody to tell: its call stopped waiting.
        Published::Abandoned => Err(Error::Disconnected("the call stopped waiting".into())),
    }
}

/// A proxy bound to one server id (the seed's `proxy.use_server(id)`).
#[derive(Clone)]
pub struct ServerProxy {
    proxy: Proxy,
    server: String,
    /// How its calls are made, unless a call gives its own timeout.
    options: CallOptions,
}

impl ServerProxy {
    /// The same server with another default timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.options.timeout = timeout;
        self
    }

    /// The same server, its calls sent again when the connection is lost
    /// before their replies (see [`Proxy::call_with`]).
    pub fn with_retry(mut self, retry: bool) -> Self {
        self.options.retry = retry;
        self
    }

    /// The same server, its calls continuing the trace `trace` (the
    /// caller's current span): each request's `traceparent` carries its
    /// trace id and span id. Without one, each call starts a new trace.
    ///
    /// ```no_run
    /// # async fn f(proxy: callme::Proxy, incoming: &str) -> Result<(), callme::Error> {
    /// // Continue the trace of the request being served.
    /// let calc = match callme::TraceContext::parse(incoming) {
    ///     Some(trace) => proxy.use_server("calc").with_trace(trace),
    ///     None => proxy.use_server("calc"),
    /// };
    /// let sum: i64 = calc.invoke("add", (1, 2)).await?;
    /// # Ok(()) }
    /// ```
    pub fn with_trace(mut self, trace: TraceContext) -> Self {
        self.options.trace = Some(trace);
        self
    }

    fn options(&self, timeout: Duration) -> CallOptions {
        CallOptions {
            timeout,
            ..self.options.clone()
        }
    }

    /// The server id.
    pub fn server_id(&self) -> &str {
        &self.server
    }

    /// Calls `func` with JSON arguments.
    ///
    /// # Errors
    ///
    /// See [`Proxy::call`].
    pub async fn call(&self, func: &str, args: Args) -> Result<Value, Error> {
        self.proxy
            .call_with(&self.server, func, args, self.options.clone())
            .await
    }

    /// Calls `func` with JSON arguments and a timeout for this call only.
    ///
    /// # Errors
    ///
    /// See [`Proxy::call`].
    pub async fn call_timeout(
        &self,
        func: &str,
        args: Args,
        timeout: Duration,
    ) -> Result<Value, Error> {
        self.proxy
            .call_with(&self.server, func, args, self.options(timeout))
            .await
    }

    /// Calls `func` with serde values: `args` serialises to a JSON array
    /// (a tuple: `(1, 2)`) or object (keyword arguments); the result
    /// deserialises into `R`.
    ///
    /// # Errors
    ///
    /// See [`Proxy::call`]; [`Error::Json`] when the arguments or result do
    /// not convert.
    pub async fn invoke<A: Serialize, R: DeserializeOwned>(
        &self,
        func: &str,
        args: A,
    ) -> Result<R, Error> {
        let args = args_from(args)?;
        let value = self.call(func, args).await?;
        serde_json::from_value(value).map_err(Error::Json)
    }

    /// The functions the server offers, with their WIT signatures.
    ///
    /// # Errors
    ///
    /// See [`Proxy::call`].
    pub async fn describe(&self) -> Result<Value, Error> {
        self.call(DESCRIBE, Args::default()).await
    }
}

/// Turns a serialisable value into call arguments.
///
/// # Errors
///
/// [`Error::Json`] when it does not serialise. An array is the positional
/// arguments, an object the keyword arguments, null none, and any other
/// value the one positional argument (`args_from(5)` is `[5]`).
pub fn args_from<A: Serialize>(args: A) -> Result<Args, Error> {
    match serde_json::to_value(args).map_err(Error::Json)? {
        Value::Array(a) => Ok(Args::positional(a)),
        Value::Object(o) => Ok(Args::keywords(o)),
        Value::Null => Ok(Args::default()),
        single => Ok(Args::positional(vec![single])),
    }
}

/// A call being made, recorded in its proxy's metrics as it ends: how it
/// ended, or `cancelled` when its caller dropped it first (a timeout of
/// the caller's own, a request handler whose client left), so that the
/// calls counted and timed include the slow ones given up on.
#[cfg_attr(
    not(feature = "metrics"),
    expect(dead_code, reason = "read only to record metrics")
)]
struct Recorded<'a> {
    proxy: &'a Proxy,
    server: &'a str,
    func: &'a str,
    started: tokio::time::Instant,
    ended: bool,
}

impl Recorded<'_> {
    /// The call ended with `outcome`.
    fn ended<T>(mut self, outcome: Result<T, Error>) -> Result<T, Error> {
        self.ended = true;
        #[cfg(feature = "metrics")]
        if let Some(metrics) = self.proxy.inner.metrics.get() {
            metrics.call_ended(self.server, self.func, &outcome, self.started.elapsed());
        }
        outcome
    }
}

impl Drop for Recorded<'_> {
    fn drop(&mut self) {
        #[cfg(feature = "metrics")]
        if !self.ended
            && let Some(metrics) = self.proxy.inner.metrics.get()
        {
            metrics.call_cancelled(self.server, self.func, self.started.elapsed());
        }
    }
}
