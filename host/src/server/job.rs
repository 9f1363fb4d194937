//! One request, from delivery to ack: decode, call, reply, then ack or give back.
//!
//! A request is acked only once its reply is confirmed by the broker, or
//! found undeliverable (its caller is gone): a host that dies mid-call
//! leaves it to be delivered again. A request that cannot be answered at
//! all (no `reply_to` or `correlation_id`) is logged and dropped. Bad
//! bodies are answered with `BadRequest`; nothing a request holds stops
//! the server.
//!
//! Each request runs in a `call` span carrying its W3C trace: the trace
//! of the request's `traceparent` when it has a valid one, a new trace
//! otherwise, and a span id of the server's own, which the reply's
//! `traceparent` carries back. Every log line of the call names them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use serde_json::Value;
use tracing::{Instrument, Span, debug, field, info, info_span, warn};

use super::MAX_IN_FLIGHT;
use super::Server;
use super::given_back::Holding;
use super::reply::{Replier, Sent};
use super::service::{Context, QUIET_IN_FLIGHT, QUIET_MAX_REQUEST_BYTES, Service};
use crate::observe::{self, BadRequest, ReplyLost};
use crate::protocol::{
    CALL_DEPTH, CONTENT_TYPE, REPLY_QUEUE, Request, Response, is_reply_queue_of, shown_id,
};
use crate::{ErrorKind, RemoteError, TraceContext};

/// One delivery of a served id.
pub(super) struct Job {
    pub(super) server: Server,
    pub(super) id: String,
    pub(super) service: Arc<Service>,
    pub(super) replier: Replier,
    /// Held by the consumer until acked or rejected: noted as given back
    /// if it goes back to the queue instead ([`super::given_back`]).
    /// `None` for a request that cannot be answered.
    pub(super) holding: Option<Holding>,
    /// The channel the request came on, kept open until it is acked.
    pub(super) _channel: Channel,
    /// The connection of its own the id consumes on, if it was moved to
    /// one ([`super::consumer`]): kept open until the request is acked.
    pub(super) _own: Option<Arc<super::OwnLink>>,
}

impl Job {
    pub(super) async fn handle(self, delivery: Delivery) {
        let parent = TraceContext::from_headers(delivery.properties.headers().as_ref());
        let trace = match &parent {
            Some(parent) => parent.child(),
            None => TraceContext::new_trace(),
        };
        let span = info_span!(
            target: "callme::server",
            "call",
            server_id = %self.id,
            function = field::Empty,
            trace_id = %trace.trace_id(),
            span_id = %trace.span_id(),
            parent_span_id = field::Empty,
        );
        if let Some(parent) = &parent {
            span.record("parent_span_id", field::display(parent.span_id()));
        }
        self.run(delivery, trace).instrument(span).await;
    }

    async fn run(mut self, mut delivery: Delivery, trace: TraceContext) {
        let holding = self.holding.take();
        let started = Instant::now();
        let _in_flight = observe::call_started(&self.id);
        let props = &delivery.properties;
        let reply_to = props.reply_to().as_ref().map(|s| s.to_string());
        let corr = props.correlation_id().as_ref().map(|s| s.to_string());
        let (Some(reply_to), Some(corr)) = (reply_to, corr) else {
            observe::bad_request(&self.id, BadRequest::Dropped);
            if let Some(held) = self.server.inner.noisy.unanswerable.admit() {
                warn!(target: "callme::server", server_id = %self.id, held_back = held, "request without reply_to or correlation_id dropped");
            }
            ack(&self._channel, &delivery, holding).await;
            return;
        };
        if !self.server.inner.echo.readable(&reply_to) {
            // The broker could answer a reply to it with an error this
            // host cannot read, which would end its connection: every
            // call on it, each time the request came back.
            observe::bad_request(&self.id, BadRequest::Dropped);
            if let Some(held) = self.server.inner.noisy.unanswerable.admit() {
                warn!(target: "callme::server", server_id = %self.id, held_back = held, reply_to = %shown_id(&reply_to).escape_debug(), "request dropped: its reply_to is too long for the broker to name it in an error (where it, the vhost or the user is not ASCII, the error could be cut in the middle of a character, which would end the host's connection)");
            }
            ack(&self._channel, &delivery, holding).await;
            return;
        }
        // Only requests that can be answered: one dropped above costs its
        // sender nothing, and would let anyone fill the queue wait with
        // any age it likes.
        observe::queue_wait(&self.id, props);
        let content_type = props.content_type().as_ref().map(|s| s.to_string());
        let body_len = delivery.data.len();
        let limit = self.server.inner.options.delivery_limit;
        // Not counting the times this host gave it back and lived.
        let quorum = self.server.inner.options.queue_shape(&self.service).quorum;
        let delivered_before = delivery_count(&delivery, quorum).saturating_sub(u64::from(
            holding
                .as_ref()
                .map_or(0, |h| self.server.inner.given_back.times(h.key())),
        ));
        let outcome = match content_type.as_deref() {
            // Before anything else about it: a request that keeps killing
            // its hosts is not decoded, let alone run, again.
            // Refused, not run: counted apart from the calls.
            _ if delivered_before >= u64::from(limit) => Err(refused(
                &self.id,
                RemoteError::new(
                    ErrorKind::Internal,
                    format!(
                        "the request was delivered {delivered_before} times without being answered \
                     (a host may have died running it each time): it is not run again"
                    ),
                ),
            )),
            Some(ct) if ct != CONTENT_TYPE => {
                observe::bad_request(&self.id, BadRequest::Answered);
                Err(RemoteError::new(
                    ErrorKind::BadRequest,
                    format!("content type `{ct}` is not {CONTENT_TYPE}"),
                ))
            }
            _ => match self.decode(std::mem::take(&mut delivery.data)).await {
                Ok(request) => {
                    let inner = &self.server.inner;
                    let depth = call_depth(&delivery);
                    let cx = Context {
                        id: &self.id,
                        executor: inner.executor.handle(),
                        quiet: self.is_quiet() && body_len <= QUIET_MAX_REQUEST_BYTES,
                        default_concurrency: inner.options.concurrency,
                        depth,
                        ends_by: ends_by(&delivery, depth),
                        trace: &trace,
                        calls_out: inner.calls_out.get(),
                    };
                    let func = request.func.clone();
                    let exported = self.service.exports(&func);
                    // A name the id does not export is the caller's to
                    // make up, of any length: as in the metrics, it is
                    // not repeated on every line of the call.
                    Span::current().record(
                        "function",
                        if exported { func.as_str() } else { "_unknown" },
                    );
                    let outcome = self.service.call(request, &cx).await;
                    let kind = outcome.as_ref().map(drop).map_err(|e| e.kind);
                    observe::call_finished(&self.id, &func, exported, kind, started.elapsed());
                    outcome
                }
                Err(e) => {
                    observe::bad_request(&self.id, BadRequest::Answered);
                    Err(e)
                }
            },
        };
        let failed = outcome.as_ref().err().map(|e| e.kind);
        let body = self.encode(outcome).await;
        let inner = &self.server.inner;
        // A lone reply goes by the caller's exchange: a pipeline saves
        // nothing without others to share it, and that way it stays on the
        // connection the request came on (the pipeline's is another, one
        // more thread to wake). A large one does too (`Pipeline::publish`).
        let queue = reply_queue(&delivery, &reply_to).filter(|_| !self.is_quiet());
        match self
            .replier
            .send(&reply_to, queue, &corr, &body, &trace)
            .await
        {
            Sent::Delivered { pipelined } => {
                if pipelined {
                    observe::reply_pipelined(&self.id);
                }
                if ack(&self._channel, &delivery, holding).await {
                    inner.answered.fetch_add(1, Ordering::Relaxed);
                }
            }
            Sent::Undeliverable(why) => {
                // Nobody can ever receive it: running the request again
                // would only lose its reply again.
                inner.undeliverable.fetch_add(1, Ordering::Relaxed);
                observe::reply_undeliverable(&self.id, why);
                let (throttle, reason) = match why {
                    ReplyLost::CallerGone => (
                        &inner.noisy.caller_gone,
                        "reply dropped: the caller's reply exchange does not exist (it left, or never was)",
                    ),
                    ReplyLost::AccessRefused => (
                        &inner.noisy.access_refused,
                        "reply dropped: this user may not publish to the caller's reply exchange",
                    ),
                };
                if let Some(held) = throttle.admit() {
                    info!(target: "callme::server", server_id = %self.id, reply_to = %reply_to.escape_debug(), held_back = held, "{reason}");
                }
                ack(&self._channel, &delivery, holding).await;
            }
            Sent::Failed(e) => {
                // Given back once for another try (here or on another
                // host); a request given back before for a reply not sent,
                // or delivered before for a reason this host did not live
                // through (another host died running it), is dropped
                // rather than run in a loop. Returns it lived through (a
                // lost connection, a look for an unreadable request) do
                // not count: the broker marks those `redelivered` too.
                let reply_failed_before = holding
                    .as_ref()
                    .is_some_and(|h| inner.given_back.reply_failed(h.key()));
                // A request whose channel is gone goes back with it, noted
                // as such (not as a reply that failed) when its holding
                // is dropped.
                let channel_lost = !self._channel.status().connected();
                let requeue = delivered_before == 0 && !reply_failed_before && !channel_lost;
                observe::reply_not_sent(&self.id);
                if let Some(held) = inner.noisy.not_sent.admit() {
                    warn!(target: "callme::server", server_id = %self.id, error = %e.chain(), requeue, held_back = held, "reply not sent");
                }
                // `basic.reject`: every RabbitMQ version counts it as a
                // failed delivery (4.3 no longer counts a `basic.nack`).
                // One given back is noted first: the broker may deliver it
                // again at once.
                let holding = match holding {
                    Some(holding) if requeue => {
                        holding.given_back();
                        None
                    }
                    Some(holding) if channel_lost => {
                        drop(holding);
                        None
                    }
                    other => other,
                };
                // `Ok(false)`: nothing was sent (the channel is gone), and
                // it goes back with the channel, noted as its holding is
                // dropped.
                let rejected = delivery.reject(BasicRejectOptions { requeue }).await;
                if matches!(rejected, Ok(true)) {
                    settled(holding);
                }
            }
        }
        debug!(target: "callme::server", server_id = %self.id, correlation_id = %corr.escape_debug(), error = ?failed, elapsed = ?started.elapsed(), "answered");
    }
}

/// Whether `value` encodes to more than `limit` bytes of JSON, never
/// told less than it encodes to by much: a walk that ends as soon as it
/// knows, so a small value costs a look at each of its items (and no
/// allocation unless it nests), a large one a look at `limit` bytes' worth.
fn encodes_past(value: &Value, limit: usize) -> bool {
    let mut size = 0usize;
    // The arrays and objects still to look into.
    let mut nested = Vec::new();
    let mut current = value;
    loop {
        match current {
            Value::Array(items) => {
                size += 2;
                for item in items {
                    size += item_size(item, limit, &mut nested) + 1;
                    if size > limit {
                        return true;
                    }
                }
            }
            Value::Object(entries) => {
                size += 2;
                for (key, item) in entries {
                    size += string_size(key, limit) + item_size(item, limit, &mut nested) + 2;
                    if size > limit {
                        return true;
                    }
                }
            }
            scalar => size += item_size(scalar, limit, &mut nested),
        }
        if size > limit {
            return true;
        }
        match nested.pop() {
            Some(next) => current = next,
            None => return false,
        }
    }
}

/// What a scalar encodes to, at most (past `limit`, at least its length);
/// an array or object is put in `nested`, to be looked into, and counts
/// nothing here.
fn item_size<'a>(value: &'a Value, limit: usize, nested: &mut Vec<&'a Value>) -> usize {
    match value {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                u.checked_ilog10().unwrap_or(0) as usize + 1
            } else if let Some(i) = n.as_i64() {
                i.unsigned_abs().checked_ilog10().unwrap_or(0) as usize + 2
            } else {
                // The longest a double is written: `-1.2345678901234567e-308`.
                25
            }
        }
        Value::String(s) => string_size(s, limit),
        Value::Array(_) | Value::Object(_) => {
            nested.push(value);
            0
        }
    }
}

/// What a string encodes to: its quotes, and an escape for each byte
/// that needs one (at most six bytes, `\u001f`). One whose length alone is
/// past `limit` is not read: past is all there is to know.
fn string_size(s: &str, limit: usize) -> usize {
    if s.len() > limit {
        return s.len() + 2;
    }
    let escaped = s
        .bytes()
        .filter(|&b| b < 0x20 || b == b'"' || b == b'\\')
        .count();
    s.len() + 2 + escaped * 5
}

/// The request is acked, or dropped for good: nothing of it is noted any
/// more.
fn settled(holding: Option<Holding>) {
    if let Some(holding) = holding {
        holding.settled();
    }
}

impl Job {
    /// Decodes a request's body. One over [`QUIET_MAX_REQUEST_BYTES`] is
    /// decoded on the plugin executor: parsing up to `max_request_bytes`
    /// of JSON takes milliseconds, which on this runtime would hold up
    /// the broker traffic of every other call (their replies, acks and
    /// deliveries), as the calls themselves would.
    async fn decode(&self, body: Vec<u8>) -> Result<Request, RemoteError> {
        let max = self.server.inner.options.max_request_bytes;
        if body.len() <= QUIET_MAX_REQUEST_BYTES {
            return Request::decode(&body, max);
        }
        self.on_executor(move || Request::decode(&body, max))
            .await
            .unwrap_or_else(|e| {
                Err(RemoteError::new(
                    ErrorKind::Internal,
                    format!("decoding the request failed: {e}"),
                ))
            })
    }

    /// Encodes a reply's body: one over [`QUIET_MAX_REQUEST_BYTES`] on the
    /// plugin executor, as a request that large is decoded there
    /// ([`Job::decode`]): a result of megabytes takes milliseconds to write.
    async fn encode(&self, outcome: Result<Value, RemoteError>) -> Vec<u8> {
        let large = match &outcome {
            Ok(value) => encodes_past(value, QUIET_MAX_REQUEST_BYTES),
            Err(e) => {
                e.message.len() > QUIET_MAX_REQUEST_BYTES
                    || encodes_past(&e.data, QUIET_MAX_REQUEST_BYTES)
            }
        };
        if !large {
            return Response::from(outcome).encode();
        }
        self.on_executor(move || Response::from(outcome).encode())
            .await
            .unwrap_or_else(|e| {
                Response::from(Err(RemoteError::new(
                    ErrorKind::Internal,
                    format!("encoding the reply failed: {e}"),
                )))
                .encode()
            })
    }

    /// Runs `work` on the plugin executor, off the runtime that carries
    /// the broker traffic.
    async fn on_executor<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        let handle = self.server.inner.executor.handle();
        handle.spawn(async move { work() }).await
    }

    /// Whether the host is nearly idle: at most [`QUIET_IN_FLIGHT`]
    /// requests taken and not yet settled, across its ids.
    fn is_quiet(&self) -> bool {
        let in_flight = &self.server.inner.in_flight;
        MAX_IN_FLIGHT as usize - in_flight.available_permits() <= QUIET_IN_FLIGHT
    }
}

/// The reply queue the caller names (`REPLY_QUEUE`), if it is the one
/// paired with the request's `reply_to`.
fn reply_queue<'a>(delivery: &'a Delivery, reply_to: &str) -> Option<&'a str> {
    use lapin::types::AMQPValue;
    let named = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(REPLY_QUEUE));
    let name = match named {
        Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes()).ok()?,
        Some(AMQPValue::ShortString(s)) => s.as_str(),
        _ => return None,
    };
    is_reply_queue_of(name, reply_to).then_some(name)
}

/// How many times the broker delivered this request before: quorum queues
/// count it in `x-delivery-count` (RabbitMQ's "Quorum Queues" guide,
/// poison message handling, 3.8 to 4.x); classic queues only say whether
/// it was delivered before at all (`redelivered`). The header is the
/// broker's only on a redelivery from a quorum queue: on a first delivery,
/// or from a classic queue, it is whatever the caller wrote, and a caller
/// could have its own request refused (and the operators' poison alert
/// raised) with one forged header.
fn delivery_count(delivery: &Delivery, quorum: bool) -> u64 {
    use lapin::types::AMQPValue;
    if !delivery.redelivered || !quorum {
        return u64::from(delivery.redelivered);
    }
    let counted = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-delivery-count"))
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
            AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
            AMQPValue::LongUInt(n) => Some(u64::from(*n)),
            AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
            AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
            AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
            AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
            _ => None,
        });
    counted.unwrap_or(u64::from(delivery.redelivered))
}

/// Counts a request of `id` refused by the delivery limit.
fn refused(id: &str, error: RemoteError) -> RemoteError {
    observe::request_refused(id, observe::Refused::DeliveryLimit);
    error
}

/// When the call that sent this request stops waiting for its reply,
/// for a call a plugin made (`depth` above 0): the host's proxy sets the
/// request's `expiration` to the time its call has left, which is at
/// most the calling call's deadline. Counted from now, so later than
/// that by the time the request waited in its queue. A client's call
/// runs to its plugin's deadline, as its caller may be one that sets an
/// `expiration` without waiting that long (a request only worth taking
/// for a while).
fn ends_by(delivery: &Delivery, depth: u32) -> Option<Instant> {
    if depth == 0 {
        return None;
    }
    let ms: u64 = delivery
        .properties
        .expiration()
        .as_ref()?
        .as_str()
        .parse()
        .ok()?;
    Instant::now().checked_add(Duration::from_millis(ms))
}

/// How many hops this request is from its client (`x-callme-depth`;
/// absent or unreadable: 0, a client's call).
fn call_depth(delivery: &Delivery) -> u32 {
    use lapin::types::AMQPValue;
    let Some(value) = delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(CALL_DEPTH))
    else {
        return 0;
    };
    let depth = match value {
        AMQPValue::LongUInt(n) => Some(u64::from(*n)),
        AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(*n)),
        AMQPValue::ShortShortInt(n) => u64::try_from(*n).ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()
            .and_then(|s| s.trim().parse().ok()),
        _ => None,
    };
    depth.map_or(0, |d| u32::try_from(d).unwrap_or(u32::MAX))
}

/// Acks a request; whether the broker took the ack. Taken, it settles
/// the request's `holding`, so that every request acked, answered or
/// dropped, is done with; one whose ack failed goes back with its channel,
/// noted as its holding is dropped.
async fn ack(channel: &Channel, delivery: &Delivery, holding: Option<Holding>) -> bool {
    // On the channel the request came on, directly: the delivery's own
    // acker goes through lapin's internal task first, one more hand-off
    // between threads for every request.
    let acked = channel
        .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
        .await;
    match acked {
        Ok(()) => {
            settled(holding);
            true
        }
        Err(e) => {
            warn!(target: "callme::server", error = %e, "ack failed (the request's channel is closed?); the broker will redeliver");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_values_encoded_size_is_told_about_and_early() {
        let limit = 16 << 10;
        assert!(!encodes_past(&json!(3), limit));
        assert!(!encodes_past(
            &json!({"a": [1, 2, "three"], "b": null}),
            limit
        ));
        assert!(encodes_past(&json!("x".repeat(limit)), limit));
        assert!(!encodes_past(&json!("x".repeat(limit - 100)), limit));
        // Many small items, nested.
        let numbers: Vec<u32> = (0..10_000).collect();
        assert!(encodes_past(&json!({"n": [numbers]}), limit));
        assert!(!encodes_past(&json!([[1, 2], [3, 4]]), limit));
        // Keys count too.
        let keys: serde_json::Map<String, Value> = (0..1000)
            .map(|i| (format!("key-{i:020}"), Value::Null))
            .collect();
        assert!(encodes_past(&Value::Object(keys), limit));
        // As told: never far below what it encodes to.
        let item = json!({"id": 1, "name": "a name", "tags": ["x", "y"], "ok": true});
        let mixed = Value::Array(vec![item; 400]);
        let encoded = serde_json::to_vec(&mixed).unwrap().len();
        assert!(encoded > limit && encodes_past(&mixed, limit), "{encoded}");
        // Doubles and escapes are written longer than they hold.
        let doubles: Vec<f64> = (0..2000).map(|i| f64::from(i) / 3.0).collect();
        let doubles = json!(doubles);
        assert!(serde_json::to_vec(&doubles).unwrap().len() > limit);
        assert!(encodes_past(&doubles, limit));
        let controls = json!("\u{1}".repeat(3000));
        assert!(serde_json::to_vec(&controls).unwrap().len() > limit);
        assert!(encodes_past(&controls, limit));
        // Never told much more than it is, either.
        for value in [
            json!([1, 22, 333]),
            json!({"a": "b\"c", "d": [true, null, -7, 1.5]}),
        ] {
            let encoded = serde_json::to_vec(&value).unwrap().len();
            assert!(!encodes_past(&value, encoded + 30), "{value}");
        }
    }
}
