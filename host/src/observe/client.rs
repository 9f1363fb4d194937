//! The metrics a proxy records about its own calls, in a registry its program gives it.
//!
//! A host's metrics are the process's (see `metrics`); a caller's belong
//! to the program that makes the calls, which already has its own
//! Prometheus registry and endpoint. [`ClientMetrics`] registers its
//! families there, and a proxy given one counts every call it makes and
//! times it, from the call to its outcome, every attempt included.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use super::label::{CallLabels, FunctionLabels, escaped};
use crate::Error;

/// Upper bounds of the call-duration buckets, in seconds: a call through
/// the broker takes a few hundred microseconds at best, and waits at most
/// its timeout (a minute by default).
const CALL_SECONDS_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

fn call_histogram() -> Histogram {
    Histogram::new(CALL_SECONDS_BUCKETS)
}

/// A proxy's call metrics, registered in its program's registry.
#[derive(Clone)]
pub(crate) struct ClientMetrics {
    calls: Family<CallLabels, Counter>,
    durations: Family<FunctionLabels, Histogram, fn() -> Histogram>,
}

impl ClientMetrics {
    /// Registers `callme_client_calls_total` and
    /// `callme_client_call_duration_seconds` in `registry`.
    pub(crate) fn register(registry: &mut Registry) -> ClientMetrics {
        let m = ClientMetrics {
            calls: Family::default(),
            durations: Family::new_with_constructor(call_histogram),
        };
        registry.register(
            "callme_client_calls",
            "Calls made through the proxy, by server id, function and outcome (`ok` or the error type: a remote error's own type, or Timeout, NoSuchServer, AccessRefused, Connection, Rejected, ...)",
            m.calls.clone(),
        );
        registry.register_with_unit(
            "callme_client_call_duration",
            "Time from making a call to its outcome, every attempt included, by server id and function",
            Unit::Seconds,
            m.durations.clone(),
        );
        m
    }

    /// A call of `function` on `server_id` ended with `outcome` after `elapsed`.
    pub(crate) fn call_ended<T>(
        &self,
        server_id: &str,
        function: &str,
        outcome: &Result<T, Error>,
        elapsed: Duration,
    ) {
        let outcome = match outcome {
            Ok(_) => "ok",
            Err(e) => e.type_name(),
        };
        self.record(server_id, function, outcome, elapsed);
    }

    /// A call of `function` on `server_id` was dropped by its caller
    /// after `elapsed`, before it ended.
    pub(crate) fn call_cancelled(&self, server_id: &str, function: &str, elapsed: Duration) {
        self.record(server_id, function, "cancelled", elapsed);
    }

    fn record(&self, server_id: &str, function: &str, outcome: &'static str, elapsed: Duration) {
        let labels = FunctionLabels {
            server_id: escaped(server_id).into_owned(),
            function: escaped(function).into_owned(),
        };
        self.durations
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        let FunctionLabels {
            server_id,
            function,
        } = labels;
        self.calls
            .get_or_create(&CallLabels {
                server_id,
                function,
                outcome,
            })
            .inc();
    }
}
