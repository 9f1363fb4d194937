//! The operator's view of a host: Prometheus metrics, liveness and readiness.
//!
//! The rest of the code reports what happens through the typed functions
//! of `metrics` (a call finished, a plugin was swapped in, the broker
//! connection was lost); nothing else names a metric. The same events keep
//! `health`, the host's readiness: up only while the broker connection is
//! and every plugin that should serve is consuming. An [`Endpoint`]
//! serves both over HTTP (`/metrics`, `/healthz`, `/readyz`).
//!
//! The metrics are the process's: a process with several servers reports
//! their sum, as `callme serve`, which has one, reports its own.
//!
//! A proxy's own calls are counted apart, in a registry its program
//! gives it (`client`, the one part a client-only build has, with the
//! `metrics` feature).
//!
//! - `metrics`: every metric of a host, its name, labels and help, and the calls that move it;
//! - `client`: the metrics of a proxy's calls;
//! - `label`: label values escaped for the text format;
//! - `health`: what readiness is made of, and the reason when it is not;
//! - `http`: the HTTP endpoint.

mod client;
#[cfg(feature = "server")]
mod health;
#[cfg(feature = "server")]
mod http;
mod label;
#[cfg(feature = "server")]
mod metrics;

pub(crate) use client::ClientMetrics;
#[cfg(feature = "server")]
pub use http::Endpoint;
#[cfg(feature = "server")]
pub(crate) use metrics::KeptInstance;
#[cfg(feature = "server")]
pub(crate) use metrics::{
    BadRequest, LinkWatch, LoadFailure, Made, Refused, ReplyLost, bad_request, call_finished,
    call_started, consuming, instance_kept, instance_made, instance_waited, plugin_call_ran,
    plugin_change_pending, plugin_http_request, plugin_refused, plugin_removed, plugin_rpc_call,
    plugin_served, queue_wait, reply_not_sent, reply_pipelined, reply_undeliverable,
    request_refused,
};
/// The Prometheus client library this crate records with, for a program
/// that gives a proxy its registry and encodes it: the same version.
pub use prometheus_client;
/// The registry a program gives a proxy
/// ([`Proxy::register_metrics`](crate::Proxy::register_metrics)).
pub use prometheus_client::registry::Registry;

/// Where a host stands, as readiness sees it.
#[cfg(feature = "server")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connecting and loading the plugins already in the directory.
    Starting,
    /// Serving: ready whenever the broker and the plugins' consumers are.
    Serving,
    /// Stopping: no longer taking requests.
    Stopping,
}

/// Tells readiness where the host stands: `callme serve` is
/// [`Phase::Starting`] until every plugin of its directory is served, and
/// [`Phase::Stopping`] from its stop signal on.
#[cfg(feature = "server")]
pub fn set_phase(phase: Phase) {
    health::HEALTH.set_phase(phase);
}

/// Whether the host is ready to take calls; the reason when it is not
/// (what `/readyz` answers).
///
/// # Errors
///
/// A short reason: still starting, stopping, the broker connection is
/// down, or a plugin that should serve is not consuming.
#[cfg(feature = "server")]
pub fn readiness() -> Result<(), String> {
    health::HEALTH.readiness()
}

/// Every metric in the Prometheus (OpenMetrics) text format, as `/metrics`
/// serves it.
#[cfg(feature = "server")]
pub fn render() -> String {
    metrics::render()
}

/// Turns the recording of per-call metrics on (the default) or off:
/// calls, their durations, queue waits, fuel and limits, instances. What
/// the host is (consumers, plugin versions and loads, the broker
/// connection) and readiness are followed either way. For a program that
/// embeds a server and serves no metrics, and for measuring what
/// recording costs (`cargo bench -p callme --bench metrics`).
#[cfg(feature = "server")]
pub fn record_calls(on: bool) {
    metrics::set_recording(on);
}
