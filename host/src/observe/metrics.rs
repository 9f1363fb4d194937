//! Every metric of a host: its name, labels and help, and the typed calls that move it.
//!
//! Names follow Prometheus conventions: a `callme_` prefix, base units
//! (seconds), counters ending in `_total` (the encoder adds the suffix and
//! the unit). Every label has a bounded set of values: server ids come
//! from the plugins directory or the code that serves them, never from a
//! caller; a function name is a label value only when the id exports that
//! function, every other name a caller sends is counted as `_unknown`;
//! outcomes and reasons are fixed words.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::health::{HEALTH, LinkState};
use super::label::{CallLabels, FunctionLabels, escaped};
use crate::protocol::TIMESTAMP_IN_MS;
use crate::{ErrorKind, PluginError, TimeoutCause};

/// The `function` label of every name a server id does not export, so
/// that callers naming whatever they like add one series, not one each.
const UNKNOWN_FUNCTION: &str = "_unknown";

/// Upper bounds of the call-duration buckets, in seconds: from a native
/// function answering within a millisecond to the longest deadline a
/// plugin may have (25 minutes), and then some.
const CALL_SECONDS_BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 1800.0,
];

/// Upper bounds of the fuel buckets: from a call that does next to
/// nothing (a few thousand units) to the most a sidecar may give a call
/// (1e14), a bucket per power of ten.
const FUEL_BUCKETS: [f64; 12] = [
    1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14,
];

/// Whether calls are counted: on unless an embedding program turns it off.
static RECORDING: AtomicBool = AtomicBool::new(true);

/// Turns the recording of per-call metrics on or off.
pub(super) fn set_recording(on: bool) {
    RECORDING.store(on, Ordering::Relaxed);
}

fn recording() -> bool {
    RECORDING.load(Ordering::Relaxed)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdLabels {
    server_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BadRequestLabels {
    server_id: String,
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReplyLostLabels {
    server_id: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LoadLabels {
    server_id: String,
    action: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    server_id: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    server_id: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    server_id: String,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MadeLabels {
    server_id: String,
    purpose: &'static str,
}

/// A plugin's call to another server: the target as its sidecar grants
/// it, and the outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    server_id: String,
    target: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcTargetLabels {
    server_id: String,
    target: String,
}

/// A plugin's HTTP request: the `host:port` its sidecar allows, and the
/// outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    server_id: String,
    host: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpHostLabels {
    server_id: String,
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    connection: &'static str,
}

fn call_histogram() -> Histogram {
    Histogram::new(CALL_SECONDS_BUCKETS)
}

fn fuel_histogram() -> Histogram {
    Histogram::new(FUEL_BUCKETS)
}

struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    call_seconds: Family<FunctionLabels, Histogram, fn() -> Histogram>,
    in_flight: Family<IdLabels, Gauge>,
    queue_wait: Family<IdLabels, Histogram, fn() -> Histogram>,
    refused: Family<RefusedLabels, Counter>,
    fuel: Family<FunctionLabels, Histogram, fn() -> Histogram>,
    limits: Family<LimitLabels, Counter>,
    instances_made: Family<MadeLabels, Counter>,
    instances_kept: Family<IdLabels, Gauge>,
    instance_waits: Family<IdLabels, Counter>,
    consumers: Family<IdLabels, Gauge>,
    bad_requests: Family<BadRequestLabels, Counter>,
    undeliverable: Family<ReplyLostLabels, Counter>,
    not_sent: Family<IdLabels, Counter>,
    pipelined: Family<IdLabels, Counter>,
    loads: Family<LoadLabels, Counter>,
    plugin_info: Family<VersionLabels, Gauge>,
    changes_pending: Gauge,
    connected: Family<ConnectionLabels, Gauge>,
    reconnects: Family<ConnectionLabels, Counter>,
    rpc_calls: Family<RpcLabels, Counter>,
    rpc_seconds: Family<RpcTargetLabels, Histogram, fn() -> Histogram>,
    http_requests: Family<HttpLabels, Counter>,
    http_seconds: Family<HttpHostLabels, Histogram, fn() -> Histogram>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            calls: Family::default(),
            call_seconds: Family::new_with_constructor(call_histogram),
            in_flight: Family::default(),
            queue_wait: Family::new_with_constructor(call_histogram),
            refused: Family::default(),
            fuel: Family::new_with_constructor(fuel_histogram),
            limits: Family::default(),
            instances_made: Family::default(),
            instances_kept: Family::default(),
            instance_waits: Family::default(),
            consumers: Family::default(),
            bad_requests: Family::default(),
            undeliverable: Family::default(),
            not_sent: Family::default(),
            pipelined: Family::default(),
            loads: Family::default(),
            plugin_info: Family::default(),
            changes_pending: Gauge::default(),
            connected: Family::default(),
            reconnects: Family::default(),
            rpc_calls: Family::default(),
            rpc_seconds: Family::new_with_constructor(call_histogram),
            http_requests: Family::default(),
            http_seconds: Family::new_with_constructor(call_histogram),
        };
        // The encoder ends each help text with a full stop.
        let mut r = Registry::default();
        r.register(
            "callme_calls",
            "Calls answered, by server id, function (`_unknown` for a name the id does not export) and outcome (`ok` or the error type)",
            m.calls.clone(),
        );
        r.register_with_unit(
            "callme_call_duration",
            "Time from taking a request to having its result (decoding and running the function; publishing the reply excluded)",
            Unit::Seconds,
            m.call_seconds.clone(),
        );
        r.register(
            "callme_calls_in_flight",
            "Requests taken and not yet settled (answered, dropped or given back), by server id",
            m.in_flight.clone(),
        );
        r.register_with_unit(
            "callme_queue_wait",
            "Time a request waited between being sent (its `timestamp_in_ms` header, or `timestamp` property) and being taken by this host, by server id; requests that carry no send time are not counted",
            Unit::Seconds,
            m.queue_wait.clone(),
        );
        r.register(
            "callme_requests_refused",
            "Requests refused without being run, by server id and reason (`delivery_limit`: delivered too many times without being answered); not counted in callme_calls",
            m.refused.clone(),
        );
        r.register(
            "callme_call_fuel",
            "Fuel a plugin call consumed (about one unit per WebAssembly instruction), instantiation included, by server id and function",
            m.fuel.clone(),
        );
        r.register(
            "callme_call_limits",
            "Plugin calls stopped by a limit, by server id and limit (`fuel`, `deadline`, `memory`: the memory cap or the result size cap)",
            m.limits.clone(),
        );
        r.register(
            "callme_instances_made",
            "Plugin instances made, by server id and purpose (`call`: by the call that needed it, `spare`: ahead of calls)",
            m.instances_made.clone(),
        );
        r.register(
            "callme_instances_kept",
            "Plugin instances ready for the next call (spares, or idle instances with reuse_instances), by server id",
            m.instances_kept.clone(),
        );
        r.register(
            "callme_instance_waits",
            "Calls that found every instance slot of the host in a call and waited for one, by server id",
            m.instance_waits.clone(),
        );
        r.register(
            "callme_consumers",
            "Consumers taking requests, by server id: 1 while the id is served and its consumer is up",
            m.consumers.clone(),
        );
        r.register(
            "callme_bad_requests",
            "Requests that could not be decoded: answered with BadRequest, or dropped when they named nowhere to reply",
            m.bad_requests.clone(),
        );
        r.register(
            "callme_undeliverable_replies",
            "Replies that could never be delivered (the caller's reply exchange is gone, or this server may not publish to it): the request is acked without one. A pipelined reply to a caller that left is dropped by the broker unseen and not counted here",
            m.undeliverable.clone(),
        );
        r.register(
            "callme_replies_not_sent",
            "Replies that could not be sent for now (the connection failed under them): the request is given back to the queue once, then dropped",
            m.not_sent.clone(),
        );
        r.register(
            "callme_replies_pipelined",
            "Replies pipelined by the default exchange to the reply queue their caller named, on the host's reply connection; the others go by each caller's own exchange",
            m.pipelined.clone(),
        );
        r.register(
            "callme_plugin_loads",
            "Plugin versions loaded from the plugins directory, by server id, action (`load` when none served, `reload` when one did) and outcome (`ok`, `invalid_settings`, `failed`)",
            m.loads.clone(),
        );
        r.register(
            "callme_plugin_info",
            "The version (SHA-256 of the component) each plugin's server id serves: 1 for the version serving",
            m.plugin_info.clone(),
        );
        r.register(
            "callme_plugin_changes_pending",
            "Plugins of the directory whose change is being applied (a new version read, compiled and its first instance tried; a removal) or waits to be: 0 once the host has acted on every change it has seen",
            m.changes_pending.clone(),
        );
        r.register(
            "callme_broker_connected",
            "1 while the broker connection is up, 0 while it is being re-established",
            m.connected.clone(),
        );
        r.register(
            "callme_broker_reconnects",
            "Broker connections re-established after being lost",
            m.reconnects.clone(),
        );
        r.register(
            "callme_plugin_rpc_calls",
            "Calls plugins made to other servers, by the calling plugin's server id, target (the server id as the sidecar grants it, `*` for one granted only by `*`, `_not_granted` for one refused) and outcome (`ok`, the error type, or the refusal: NotGranted, CallDepthExceeded, TooManyCalls, ...; `cancelled` when the calling call ended first)",
            m.rpc_calls.clone(),
        );
        r.register_with_unit(
            "callme_plugin_rpc_call_duration",
            "Time a plugin's call to another server took, from sending it to its outcome, by the calling plugin's server id and target; calls refused before being sent are not timed",
            Unit::Seconds,
            m.rpc_seconds.clone(),
        );
        r.register(
            "callme_plugin_http_requests",
            "HTTP requests plugins made, by the plugin's server id, host (`host:port` as the sidecar allows it, `_not_allowed` for one refused) and outcome (`ok`: a response came, whatever its status; `denied`, `limit`: refused before any connection; `timeout`: no response head in time; `too_large`: its length is over the cap, or its head over what the call may receive; `error`; `cancelled`: the call or the guest dropped it first)",
            m.http_requests.clone(),
        );
        r.register_with_unit(
            "callme_plugin_http_request_duration",
            "Time from an allowed HTTP request of a plugin to its response's head (or its failure), by the plugin's server id and host",
            Unit::Seconds,
            m.http_seconds.clone(),
        );
        Metrics { registry: r, ..m }
    }
}

/// Every metric in the OpenMetrics text format.
pub(super) fn render() -> String {
    let mut text = String::new();
    // Writing to a String cannot fail, and every label value is escaped.
    let _ = prometheus_client::encoding::text::encode(&mut text, &METRICS.registry);
    text
}

fn id(server_id: &str) -> IdLabels {
    IdLabels {
        server_id: escaped(server_id).into_owned(),
    }
}

/// A request being handled; dropped when it is settled.
pub(crate) struct InFlight(Option<Gauge>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(gauge) = &self.0 {
            gauge.dec();
        }
    }
}

/// A request of `server_id` was taken from the queue.
pub(crate) fn call_started(server_id: &str) -> InFlight {
    if !recording() {
        return InFlight(None);
    }
    let gauge = METRICS.in_flight.get_or_create_owned(&id(server_id));
    gauge.inc();
    InFlight(Some(gauge))
}

/// A request of `server_id` with `properties` was taken from the queue
/// now: how long it waited since its caller sent it, when it says.
pub(crate) fn queue_wait(server_id: &str, properties: &lapin::BasicProperties) {
    if !recording() {
        return;
    }
    if let Some(waited) = waited(properties, SystemTime::now()) {
        METRICS
            .queue_wait
            .get_or_create(&id(server_id))
            .observe(waited.as_secs_f64());
    }
}

/// How far apart a caller's clock and this host's are believed to be.
const CLOCK_SLACK: Duration = Duration::from_secs(60);

/// The longest wait believed of a request without an `expiration`: one
/// sent longer ago says so falsely (or its caller's clock is wrong), and
/// is not recorded.
const MAX_BELIEVED_WAIT: Duration = Duration::from_secs(24 * 60 * 60);

/// How long a request with `properties` waited until `now`, when it says
/// when it was sent and that is believable: no longer than its
/// `expiration` (past which the broker drops it) and a minute for clocks,
/// or [`MAX_BELIEVED_WAIT`]. Any caller can write the timestamp, and one
/// that claims years must not move the histogram everyone reads.
fn waited(properties: &lapin::BasicProperties, now: SystemTime) -> Option<Duration> {
    let sent = sent_at(properties)?;
    // A caller's clock a little ahead of this host's gives a negative
    // wait: 0. Far ahead, it is not believed either.
    if sent
        .duration_since(now)
        .is_ok_and(|ahead| ahead > CLOCK_SLACK)
    {
        return None;
    }
    let waited = now.duration_since(sent).unwrap_or(Duration::ZERO);
    let believed = properties
        .expiration()
        .as_ref()
        .and_then(|e| e.as_str().parse::<u64>().ok())
        .map_or(MAX_BELIEVED_WAIT, |ms| {
            Duration::from_millis(ms).saturating_add(CLOCK_SLACK)
        });
    (waited <= believed).then_some(waited)
}

/// When a request was sent: its `timestamp_in_ms` header (milliseconds,
/// set by callme's proxies and by RabbitMQ's message timestamp
/// interceptor), else its `timestamp` property (whole seconds).
fn sent_at(properties: &lapin::BasicProperties) -> Option<SystemTime> {
    use lapin::types::AMQPValue;
    let millis = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(TIMESTAMP_IN_MS))
        .and_then(|v| match v {
            AMQPValue::LongLongInt(n) => u64::try_from(*n).ok(),
            AMQPValue::LongInt(n) => u64::try_from(*n).ok(),
            AMQPValue::LongUInt(n) => Some(u64::from(*n)),
            AMQPValue::Timestamp(n) => Some(*n),
            _ => None,
        });
    match millis {
        Some(ms) => UNIX_EPOCH.checked_add(Duration::from_millis(ms)),
        None => UNIX_EPOCH.checked_add(Duration::from_secs((*properties.timestamp())?)),
    }
}

/// Why a request was refused without being run.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Refused {
    /// It was delivered too many times without being answered.
    DeliveryLimit,
}

/// A request of `server_id` was refused without being run.
pub(crate) fn request_refused(server_id: &str, why: Refused) {
    let reason = match why {
        Refused::DeliveryLimit => "delivery_limit",
    };
    METRICS
        .refused
        .get_or_create(&RefusedLabels {
            server_id: escaped(server_id).into_owned(),
            reason,
        })
        .inc();
}

/// A call of the plugin serving `server_id` ran `function` and consumed
/// `fuel`; `outcome` says whether a limit stopped it.
pub(crate) fn plugin_call_ran(
    server_id: &str,
    function: &str,
    fuel: u64,
    outcome: Result<(), &PluginError>,
) {
    if !recording() {
        return;
    }
    let server_id = escaped(server_id).into_owned();
    let limit = match outcome {
        Err(PluginError::Timeout {
            cause: TimeoutCause::Fuel,
            ..
        }) => Some("fuel"),
        Err(PluginError::Timeout {
            cause: TimeoutCause::Deadline,
            ..
        }) => Some("deadline"),
        Err(PluginError::MemoryLimit { .. }) => Some("memory"),
        _ => None,
    };
    if let Some(limit) = limit {
        METRICS
            .limits
            .get_or_create(&LimitLabels {
                server_id: server_id.clone(),
                limit,
            })
            .inc();
    }
    METRICS
        .fuel
        .get_or_create(&FunctionLabels {
            server_id,
            function: escaped(function).into_owned(),
        })
        .observe(fuel as f64);
}

/// What a plugin instance was made for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Made {
    /// By the call that needed it.
    Call,
    /// Ahead of calls, as a spare.
    Spare,
}

/// An instance of the plugin serving `server_id` was made.
pub(crate) fn instance_made(server_id: &str, purpose: Made) {
    if !recording() {
        return;
    }
    let purpose = match purpose {
        Made::Call => "call",
        Made::Spare => "spare",
    };
    METRICS
        .instances_made
        .get_or_create(&MadeLabels {
            server_id: escaped(server_id).into_owned(),
            purpose,
        })
        .inc();
}

/// A call of the plugin serving `server_id` waited for an instance slot.
pub(crate) fn instance_waited(server_id: &str) {
    if recording() {
        METRICS.instance_waits.get_or_create(&id(server_id)).inc();
    }
}

/// An instance kept ready for a call; dropped when a call takes it or it
/// is let go.
pub(crate) struct KeptInstance(Option<Gauge>);

impl Drop for KeptInstance {
    fn drop(&mut self) {
        if let Some(gauge) = &self.0 {
            gauge.dec();
        }
    }
}

/// An instance of the plugin serving `server_id` is kept ready.
pub(crate) fn instance_kept(server_id: &str) -> KeptInstance {
    if !recording() {
        return KeptInstance(None);
    }
    let gauge = METRICS.instances_kept.get_or_create_owned(&id(server_id));
    gauge.inc();
    KeptInstance(Some(gauge))
}

/// A call of `function` on `server_id` produced `outcome` in `elapsed`.
/// `exported` says whether the id has that function (or `_describe`):
/// any other name is counted as `_unknown`.
pub(crate) fn call_finished(
    server_id: &str,
    function: &str,
    exported: bool,
    outcome: Result<(), ErrorKind>,
    elapsed: Duration,
) {
    if !recording() {
        return;
    }
    let function = if exported {
        escaped(function).into_owned()
    } else {
        UNKNOWN_FUNCTION.to_string()
    };
    let server_id = escaped(server_id).into_owned();
    let labels = FunctionLabels {
        server_id,
        function,
    };
    METRICS
        .call_seconds
        .get_or_create(&labels)
        .observe(elapsed.as_secs_f64());
    let FunctionLabels {
        server_id,
        function,
    } = labels;
    let outcome = match outcome {
        Ok(()) => "ok",
        Err(kind) => kind.as_str(),
    };
    METRICS
        .calls
        .get_or_create(&CallLabels {
            server_id,
            function,
            outcome,
        })
        .inc();
}

/// What became of a request that could not be decoded.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BadRequest {
    /// Answered with `BadRequest`.
    Answered,
    /// Dropped: it named nowhere to reply (no `reply_to` or
    /// `correlation_id`, or a `reply_to` the broker could not name back,
    /// `protocol::is_answerable_reply_to`).
    Dropped,
}

/// A request of `server_id` could not be decoded.
pub(crate) fn bad_request(server_id: &str, what: BadRequest) {
    let action = match what {
        BadRequest::Answered => "answered",
        BadRequest::Dropped => "dropped",
    };
    METRICS
        .bad_requests
        .get_or_create(&BadRequestLabels {
            server_id: escaped(server_id).into_owned(),
            action,
        })
        .inc();
}

/// Why a reply can never be delivered.
#[derive(Debug, Clone, Copy)]
pub(crate) enum ReplyLost {
    /// The caller's reply exchange does not exist.
    CallerGone,
    /// This server may not publish to it.
    AccessRefused,
}

/// A reply of `server_id` could never be delivered.
pub(crate) fn reply_undeliverable(server_id: &str, why: ReplyLost) {
    let reason = match why {
        ReplyLost::CallerGone => "caller_gone",
        ReplyLost::AccessRefused => "access_refused",
    };
    METRICS
        .undeliverable
        .get_or_create(&ReplyLostLabels {
            server_id: escaped(server_id).into_owned(),
            reason,
        })
        .inc();
}

/// A reply of `server_id` was pipelined by the default exchange.
pub(crate) fn reply_pipelined(server_id: &str) {
    if !recording() {
        return;
    }
    METRICS.pipelined.get_or_create(&id(server_id)).inc();
}

/// A reply of `server_id` could not be sent for now.
pub(crate) fn reply_not_sent(server_id: &str) {
    METRICS.not_sent.get_or_create(&id(server_id)).inc();
}

/// A call of the plugin serving `server_id` to `target` (as its grant
/// names it) ended with `outcome`; `sent` is how long it took, for one
/// that was sent.
pub(crate) fn plugin_rpc_call(
    server_id: &str,
    target: &str,
    outcome: Result<(), &'static str>,
    sent: Option<Duration>,
) {
    if !recording() {
        return;
    }
    let labels = RpcTargetLabels {
        server_id: escaped(server_id).into_owned(),
        target: escaped(target).into_owned(),
    };
    if let Some(elapsed) = sent {
        METRICS
            .rpc_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }
    let RpcTargetLabels { server_id, target } = labels;
    METRICS
        .rpc_calls
        .get_or_create(&RpcLabels {
            server_id,
            target,
            outcome: outcome.err().unwrap_or("ok"),
        })
        .inc();
}

/// An HTTP request of the plugin serving `server_id` to `host` (as its
/// grant names it) ended with `outcome`; `sent` is how long it took, for
/// one that was sent.
pub(crate) fn plugin_http_request(
    server_id: &str,
    host: &str,
    outcome: &'static str,
    sent: Option<Duration>,
) {
    if !recording() {
        return;
    }
    let labels = HttpHostLabels {
        server_id: escaped(server_id).into_owned(),
        host: escaped(host).into_owned(),
    };
    if let Some(elapsed) = sent {
        METRICS
            .http_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }
    let HttpHostLabels { server_id, host } = labels;
    METRICS
        .http_requests
        .get_or_create(&HttpLabels {
            server_id,
            host,
            outcome,
        })
        .inc();
}

/// A consumer of a server id taking requests; dropped when it ends.
pub(crate) struct Consuming(String);

impl Drop for Consuming {
    fn drop(&mut self) {
        HEALTH.consumer(&self.0, false, |now| {
            METRICS
                .consumers
                .get_or_create(&id(&self.0))
                .set(now.into());
        });
    }
}

/// A consumer of `server_id` started taking requests.
pub(crate) fn consuming(server_id: &str) -> Consuming {
    HEALTH.consumer(server_id, true, |now| {
        METRICS
            .consumers
            .get_or_create(&id(server_id))
            .set(now.into());
    });
    Consuming(server_id.to_string())
}

fn load_action(reload: bool) -> &'static str {
    if reload { "reload" } else { "load" }
}

/// `server_id` serves `version` of its plugin now; `reload` when it
/// replaced a version that served.
pub(crate) fn plugin_served(server_id: &str, version: &str, reload: bool) {
    let server_id = escaped(server_id).into_owned();
    METRICS
        .loads
        .get_or_create(&LoadLabels {
            server_id: server_id.clone(),
            action: load_action(reload),
            outcome: "ok",
        })
        .inc();
    if let Some(old) = HEALTH.plugin_served(&server_id, version) {
        METRICS.plugin_info.remove(&VersionLabels {
            server_id: server_id.clone(),
            version: old,
        });
    }
    METRICS
        .plugin_info
        .get_or_create(&VersionLabels {
            server_id,
            version: escaped(version).into_owned(),
        })
        .set(1);
}

/// Why a plugin version was not served.
#[derive(Debug, Clone, Copy)]
pub(crate) enum LoadFailure {
    /// Its sidecar is invalid.
    InvalidSettings,
    /// It did not load, or the server refused it.
    Failed,
}

/// A version of `server_id`'s plugin was not served; `reload` when
/// another version keeps serving.
pub(crate) fn plugin_refused(server_id: &str, reload: bool, why: LoadFailure) {
    let outcome = match why {
        LoadFailure::InvalidSettings => "invalid_settings",
        LoadFailure::Failed => "failed",
    };
    METRICS
        .loads
        .get_or_create(&LoadLabels {
            server_id: escaped(server_id).into_owned(),
            action: load_action(reload),
            outcome,
        })
        .inc();
}

/// `server_id`'s plugin left the directory: it is no longer served.
pub(crate) fn plugin_removed(server_id: &str) {
    let server_id = escaped(server_id).into_owned();
    if let Some(version) = HEALTH.plugin_removed(&server_id) {
        METRICS
            .plugin_info
            .remove(&VersionLabels { server_id, version });
    }
}

/// A change to a plugin of the directory began to be applied (`true`)
/// or was applied (`false`).
pub(crate) fn plugin_change_pending(pending: bool) {
    if pending {
        METRICS.changes_pending.inc();
    } else {
        METRICS.changes_pending.dec();
    }
}

/// One broker connection as the metrics follow it, from its first
/// connect; dropped when it is closed for good.
pub(crate) struct LinkWatch {
    kind: &'static str,
    state: LinkState,
}

impl LinkWatch {
    /// A connection named `name` (`callme server`, `callme proxy`) is up.
    pub(crate) fn up(name: &'static str) -> LinkWatch {
        // The label is the kind of connection: `server`, `proxy`.
        let kind = name.strip_prefix("callme ").unwrap_or(name);
        let mut watch = LinkWatch {
            kind,
            state: LinkState::Closed,
        };
        watch.moved(LinkState::Up);
        watch
    }

    /// The connection was lost; it is being re-established.
    pub(crate) fn down(&mut self) {
        self.moved(LinkState::Down);
    }

    /// The connection was re-established.
    pub(crate) fn reconnected(&mut self) {
        METRICS
            .reconnects
            .get_or_create(&ConnectionLabels {
                connection: self.kind,
            })
            .inc();
        self.moved(LinkState::Up);
    }

    fn moved(&mut self, to: LinkState) {
        let from = std::mem::replace(&mut self.state, to);
        HEALTH.link_moved(self.kind, from, to, |connected| {
            METRICS
                .connected
                .get_or_create(&ConnectionLabels {
                    connection: self.kind,
                })
                .set(connected.into());
        });
    }
}

impl Drop for LinkWatch {
    fn drop(&mut self) {
        self.moved(LinkState::Closed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Consumers of one id started and ended on several threads at once
    /// (a plugin removed and deployed again while its old consumer ends)
    /// leave the gauge at the count: each sets it with the count it made.
    #[test]
    fn consumers_started_and_ended_at_once_leave_the_gauge_at_their_count() {
        let server_id = "gauge-race";
        let kept = consuming(server_id);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..20_000 {
                        drop(consuming(server_id));
                    }
                });
            }
        });
        let gauge = || METRICS.consumers.get_or_create(&id(server_id)).get();
        assert_eq!(gauge(), 1);
        drop(kept);
        assert_eq!(gauge(), 0);
    }

    #[test]
    fn a_wait_longer_than_the_request_could_have_waited_is_not_believed() {
        use lapin::types::{AMQPValue, FieldTable};
        let now = SystemTime::now();
        let sent = |ago: Duration, expiration: Option<&str>| {
            let ms = now.duration_since(UNIX_EPOCH).unwrap() - ago;
            let mut headers = FieldTable::default();
            headers.insert(
                TIMESTAMP_IN_MS.into(),
                AMQPValue::LongLongInt(ms.as_millis() as i64),
            );
            let props = lapin::BasicProperties::default().with_headers(headers);
            match expiration {
                Some(e) => props.with_expiration(e.into()),
                None => props,
            }
        };
        let secs = Duration::from_secs;
        let w = |p| waited(&p, now).map(|d| d.as_secs());
        assert_eq!(w(sent(secs(5), Some("60000"))), Some(5));
        assert_eq!(w(sent(secs(100), Some("60000"))), Some(100));
        assert_eq!(w(sent(secs(200), Some("60000"))), None);
        assert_eq!(w(sent(secs(3600), None)), Some(3600));
        assert_eq!(w(sent(secs(55 * 365 * 86400), None)), None);
        let ahead = |by: Duration| {
            let ms = now.duration_since(UNIX_EPOCH).unwrap() + by;
            let mut headers = FieldTable::default();
            headers.insert(
                TIMESTAMP_IN_MS.into(),
                AMQPValue::LongLongInt(ms.as_millis() as i64),
            );
            lapin::BasicProperties::default().with_headers(headers)
        };
        assert_eq!(w(ahead(secs(5))), Some(0), "a clock a little ahead");
        assert_eq!(w(ahead(secs(3600))), None, "a clock far ahead");
        let zero = lapin::BasicProperties::default().with_timestamp(0);
        assert_eq!(waited(&zero, now), None, "sent in 1970");
    }

    fn lines_with(text: &str, needle: &str) -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(needle))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn unknown_function_names_share_one_series() {
        for i in 0..20 {
            call_finished(
                "metrics-unit",
                &format!("made-up-{i}"),
                false,
                Err(ErrorKind::NoSuchFunction),
                Duration::from_millis(1),
            );
        }
        call_finished(
            "metrics-unit",
            "add",
            true,
            Ok(()),
            Duration::from_millis(3),
        );
        let text = render();
        assert!(!text.contains("made-up"), "{text}");
        let mut calls = lines_with(&text, "callme_calls_total{server_id=\"metrics-unit\"");
        calls.sort();
        assert_eq!(
            calls,
            [
                "callme_calls_total{server_id=\"metrics-unit\",function=\"_unknown\",outcome=\"NoSuchFunction\"} 20",
                "callme_calls_total{server_id=\"metrics-unit\",function=\"add\",outcome=\"ok\"} 1",
            ]
        );
        assert!(text.contains("# TYPE callme_call_duration_seconds histogram"));
        assert!(text.contains(
            "callme_call_duration_seconds_bucket{le=\"0.0025\",server_id=\"metrics-unit\",function=\"_unknown\"} 20"
        ), "{text}");
    }

    #[test]
    fn a_swapped_version_replaces_the_info_series() {
        plugin_served("metrics-swap", "v1", false);
        plugin_served("metrics-swap", "v2", true);
        plugin_refused("metrics-swap", true, LoadFailure::Failed);
        let text = render();
        assert_eq!(
            lines_with(&text, "callme_plugin_info{server_id=\"metrics-swap\""),
            ["callme_plugin_info{server_id=\"metrics-swap\",version=\"v2\"} 1"]
        );
        for line in [
            "callme_plugin_loads_total{server_id=\"metrics-swap\",action=\"load\",outcome=\"ok\"} 1",
            "callme_plugin_loads_total{server_id=\"metrics-swap\",action=\"reload\",outcome=\"ok\"} 1",
            "callme_plugin_loads_total{server_id=\"metrics-swap\",action=\"reload\",outcome=\"failed\"} 1",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        plugin_removed("metrics-swap");
        assert!(lines_with(&render(), "callme_plugin_info{server_id=\"metrics-swap\"").is_empty());
    }

    #[test]
    fn the_send_time_is_the_header_in_ms_else_the_timestamp_in_seconds() {
        use lapin::BasicProperties;
        use lapin::types::{AMQPValue, FieldTable};
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        let mut headers = FieldTable::default();
        headers.insert(
            TIMESTAMP_IN_MS.into(),
            AMQPValue::LongLongInt(1_700_000_000_123),
        );
        let both = BasicProperties::default()
            .with_timestamp(1_600_000_000)
            .with_headers(headers);
        assert_eq!(sent_at(&both), Some(at(1_700_000_000_123)));
        let seconds = BasicProperties::default().with_timestamp(1_600_000_000);
        assert_eq!(sent_at(&seconds), Some(at(1_600_000_000_000)));
        assert_eq!(sent_at(&BasicProperties::default()), None);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escaped("stats.mean"), "stats.mean");
        assert_eq!(escaped("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
