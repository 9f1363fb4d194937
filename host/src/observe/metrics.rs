//! Every metric of a host: its name, labels and help, and the typed calls that move it.
//!
//! Names follow Prometheus conventions: a `callme_` prefix, base units
//! (seconds), counters ending in `_total` (the encoder adds the suffix and
//! the unit). Every label has a bounded set of values: server ids come
//! from the plugins directory or the code that serves them, never from a
//! caller; a function name is a label value only when the id exports that
//! function, every other name a caller sends is counted as `_unknown`;
//! outcomes and reasons are fixed words.

use std::borrow::Cow;
use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::health::{HEALTH, LinkState};
use crate::ErrorKind;

/// The `function` label of every name a server id does not export, so
/// that callers naming whatever they like add one series, not one each.
const UNKNOWN_FUNCTION: &str = "_unknown";

/// Upper bounds of the call-duration buckets, in seconds: from a native
/// function answering within a millisecond to the longest deadline a
/// plugin may have (30 minutes).
const CALL_SECONDS_BUCKETS: [f64; 17] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 1800.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    server_id: String,
    function: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FunctionLabels {
    server_id: String,
    function: String,
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
struct ConnectionLabels {
    connection: &'static str,
}

fn call_histogram() -> Histogram {
    Histogram::new(CALL_SECONDS_BUCKETS)
}

struct Metrics {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    call_seconds: Family<FunctionLabels, Histogram, fn() -> Histogram>,
    in_flight: Family<IdLabels, Gauge>,
    consumers: Family<IdLabels, Gauge>,
    bad_requests: Family<BadRequestLabels, Counter>,
    undeliverable: Family<ReplyLostLabels, Counter>,
    not_sent: Family<IdLabels, Counter>,
    loads: Family<LoadLabels, Counter>,
    plugin_info: Family<VersionLabels, Gauge>,
    connected: Family<ConnectionLabels, Gauge>,
    reconnects: Family<ConnectionLabels, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::default(),
            calls: Family::default(),
            call_seconds: Family::new_with_constructor(call_histogram),
            in_flight: Family::default(),
            consumers: Family::default(),
            bad_requests: Family::default(),
            undeliverable: Family::default(),
            not_sent: Family::default(),
            loads: Family::default(),
            plugin_info: Family::default(),
            connected: Family::default(),
            reconnects: Family::default(),
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
            "Replies that could never be delivered (the caller's reply exchange is gone, or this server may not publish to it): the request is acked without one",
            m.undeliverable.clone(),
        );
        r.register(
            "callme_replies_not_sent",
            "Replies that could not be sent for now (the connection failed under them): the request is given back to the queue once, then dropped",
            m.not_sent.clone(),
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
            "callme_broker_connected",
            "1 while the broker connection is up, 0 while it is being re-established",
            m.connected.clone(),
        );
        r.register(
            "callme_broker_reconnects",
            "Broker connections re-established after being lost",
            m.reconnects.clone(),
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

/// A label value as the text format needs it: server ids and WIT names
/// never hold a quote, a backslash or a line break, but native function
/// names are whatever the code registered.
fn escaped(value: &str) -> Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(value);
    }
    Cow::Owned(
        value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n"),
    )
}

fn id(server_id: &str) -> IdLabels {
    IdLabels {
        server_id: escaped(server_id).into_owned(),
    }
}

/// A request being handled; dropped when it is settled.
pub(crate) struct InFlight(Gauge);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A request of `server_id` was taken from the queue.
pub(crate) fn call_started(server_id: &str) -> InFlight {
    let gauge = METRICS.in_flight.get_or_create_owned(&id(server_id));
    gauge.inc();
    InFlight(gauge)
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
    /// Dropped: it named nowhere to reply (no `reply_to` or `correlation_id`).
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

/// A reply of `server_id` could not be sent for now.
pub(crate) fn reply_not_sent(server_id: &str) {
    METRICS.not_sent.get_or_create(&id(server_id)).inc();
}

/// A consumer of a server id taking requests; dropped when it ends.
pub(crate) struct Consuming(String);

impl Drop for Consuming {
    fn drop(&mut self) {
        let now = HEALTH.consumer(&self.0, false);
        METRICS
            .consumers
            .get_or_create(&id(&self.0))
            .set(now.into());
    }
}

/// A consumer of `server_id` started taking requests.
pub(crate) fn consuming(server_id: &str) -> Consuming {
    let now = HEALTH.consumer(server_id, true);
    METRICS
        .consumers
        .get_or_create(&id(server_id))
        .set(now.into());
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
        let connected = HEALTH.link_moved(self.kind, from, to);
        METRICS
            .connected
            .get_or_create(&ConnectionLabels {
                connection: self.kind,
            })
            .set(connected.into());
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
    fn label_values_are_escaped() {
        assert_eq!(escaped("stats.mean"), "stats.mean");
        assert_eq!(escaped("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
