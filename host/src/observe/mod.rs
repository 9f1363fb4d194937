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
//! - `metrics`: every metric, its name, labels and help, and the calls that move it;
//! - `health`: what readiness is made of, and the reason when it is not;
//! - `http`: the HTTP endpoint.

mod health;
mod http;
mod metrics;

pub use http::Endpoint;
pub(crate) use metrics::{
    BadRequest, LinkWatch, LoadFailure, ReplyLost, bad_request, call_finished, call_started,
    consuming, plugin_refused, plugin_removed, plugin_served, reply_not_sent, reply_undeliverable,
};

/// Where a host stands, as readiness sees it.
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
pub fn readiness() -> Result<(), String> {
    health::HEALTH.readiness()
}

/// Every metric in the Prometheus (OpenMetrics) text format, as `/metrics`
/// serves it.
pub fn render() -> String {
    metrics::render()
}
