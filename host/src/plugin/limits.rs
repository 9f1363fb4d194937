//! Per-call limits of a plugin, with the defaults every plugin starts from.
//!
//! Each call of a plugin function gets its own fuel, deadline and memory
//! cap: a runaway call ends by its limits without touching any other call.

use std::time::Duration;

use serde::Deserialize;

/// Fuel is spent per WebAssembly instruction (roughly one unit each).
/// Measured on the 2-core development machine (`callme invoke --fuel N
/// hostile.wasm spin`), a guest in a tight loop burns about 5e9 units a
/// second, so this default stops a runaway in about a second, while naive
/// `fib(35)` (about 0.45e9 units, 0.25 s) stays well inside it.
pub const DEFAULT_FUEL: u64 = 5_000_000_000;

/// Wall-clock time a call may take, including time the guest spends
/// blocked in WASI calls (sleeping, polling) where fuel is not spent.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(10);

/// Linear memory a single call may grow to: enough for ordinary guests,
/// including interpreters, while a memory bomb stops early.
pub const DEFAULT_MEMORY_BYTES: usize = 64 << 20;

/// Largest JSON result a call may return. A bigger result is refused with
/// `MemoryLimit` rather than pushed through the broker.
pub const DEFAULT_RESULT_BYTES: usize = 16 << 20;

/// Guest stdout and stderr kept per call and stream for the log; the rest
/// is dropped (the guest is not told, so printing never fails).
pub const DEFAULT_OUTPUT_BYTES: usize = 64 << 10;

/// Spare instances a served plugin keeps by default: enough to answer a
/// small burst without waiting for instantiation, while holding few pool
/// slots and little memory.
pub const DEFAULT_PREWARM: usize = 2;

/// The limits of each call of one plugin.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Fuel per call.
    pub fuel: u64,
    /// Wall-clock deadline per call.
    #[serde(with = "millis", rename = "deadline_ms")]
    pub deadline: Duration,
    /// Linear memory cap per call, in bytes.
    pub memory_bytes: usize,
    /// Result size cap, in bytes of JSON.
    pub result_bytes: usize,
    /// Captured stdout/stderr per stream, in bytes.
    pub output_bytes: usize,
    /// Keep instances between calls instead of a fresh sandbox per call.
    /// Faster for big guests (interpreters), but state a guest keeps in
    /// memory is seen by the next call it serves; an instance is
    /// discarded after any error. Off by default.
    pub reuse_instances: bool,
    /// Spare instances kept ready, fresh and never called, so a call need
    /// not wait for its instance to be made; each one a call takes is
    /// replaced in the background. Every call still runs in an instance of
    /// its own. Only a server keeps spares (see `Plugin::start_prewarm`);
    /// with `reuse_instances` there are none.
    pub prewarm: usize,
    /// Calls in flight for this plugin, overriding the server's
    /// `--concurrency` (its share of the host).
    pub concurrency: Option<usize>,
    /// Lowest level of the guest's log lines (host import and captured
    /// stdout/stderr) that reach the host log.
    pub log_level: GuestLogLevel,
}

/// Lowest level of guest log lines kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestLogLevel {
    /// Everything.
    #[default]
    Trace,
    /// Debug and above.
    Debug,
    /// Info and above (captured stdout/stderr is info).
    Info,
    /// Warnings and errors.
    Warn,
    /// Errors only.
    Error,
    /// Nothing.
    Off,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: DEFAULT_FUEL,
            deadline: DEFAULT_DEADLINE,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            result_bytes: DEFAULT_RESULT_BYTES,
            output_bytes: DEFAULT_OUTPUT_BYTES,
            reuse_instances: false,
            prewarm: DEFAULT_PREWARM,
            concurrency: None,
            log_level: GuestLogLevel::Trace,
        }
    }
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}
