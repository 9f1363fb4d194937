//! The limits of one call: fuel, deadline, memory, and the sizes of what it returns and prints.
//!
//! Each call of a plugin function gets its own fuel, deadline and memory
//! cap: a runaway call ends by its limits without touching any other call.
//! The sandbox enforces them ([`super::instances`] arms each store, the
//! memory limiter in [`super::sandbox`] caps growth) and `trap` tells which
//! one stopped a call. The bounds here are those a sidecar must keep to
//! (checked in [`super::settings`]).

use std::time::Duration;

/// Fuel is spent per WebAssembly instruction (roughly one unit each).
/// Measured on the 2-core development machine (`callme invoke --fuel N
/// hostile.wasm spin`), a guest in a tight loop burns about 5e9 units a
/// second, so this default stops a runaway in about a second, while naive
/// `fib(35)` (about 0.45e9 units, 0.25 s) stays well inside it.
pub const DEFAULT_FUEL: u64 = 5_000_000_000;

/// A running guest yields to its executor every this many units of fuel,
/// about 0.2 ms of CPU at the rate above: a call polled outside the plugin
/// executor (see `server::service`) moves there within that, and calls
/// sharing an executor thread take turns. Each yield costs a poll, about
/// a microsecond: well under 1% of a busy guest's time.
pub(crate) const YIELD_EVERY_FUEL: u64 = 1_000_000;

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

/// Most fuel a sidecar may give a call: about 5.5 hours of CPU at the
/// measured 5e9 units a second, more than a call can burn within
/// [`MAX_DEADLINE`] even on a machine ten times faster. To rely on the
/// deadline alone, set this.
pub(crate) const MAX_FUEL: u64 = 100_000_000_000_000;

/// Longest deadline of a served call (a sidecar's, or one
/// [`Server::serve_plugin`](crate::Server::serve_plugin) takes). The server
/// acks a request once it is answered, and RabbitMQ closes the channel of
/// a consumer that holds a delivery unacked longer than its
/// `consumer_timeout` (30 minutes by default since 3.8.15, and in 4.x: the
/// "Delivery Acknowledgement Timeout" of its consumers guide): a longer
/// call could never be answered. Five minutes short of it, for the time a
/// request waits for its turn and its reply for its confirm: a call that
/// took the whole 30 minutes would be acked just past the broker's limit,
/// and the channel closed under every other call on it (run again).
pub(crate) const MAX_DEADLINE: Duration = Duration::from_secs(25 * 60);

/// Longest deadline of a call run outside a server (`callme invoke`, a
/// program's own [`Plugin::call`](crate::Plugin::call)): a year, a bound
/// only so that the call's clock cannot overflow.
pub(crate) const MAX_LOCAL_DEADLINE: Duration = Duration::from_secs(365 * 24 * 3600);

/// Smallest memory cap: one WebAssembly page. Below it no guest with a
/// linear memory can even be instantiated.
pub(crate) const MIN_MEMORY_BYTES: usize = 64 << 10;

/// Largest memory cap: the whole address space of a 32-bit linear memory.
/// The runtime's own maximum (`RuntimeConfig::max_memory_bytes`, 1 GiB by
/// default) is checked when the plugin is loaded.
pub(crate) const MAX_MEMORY_BYTES: usize = 4 << 30;

/// Largest result cap: RabbitMQ refuses messages over 512 MiB whatever its
/// `max_message_size`, so a bigger result could never be delivered.
pub(crate) const MAX_RESULT_BYTES: usize = 512 << 20;

/// Largest capture of stdout/stderr per stream: it is held in memory for
/// every call in flight, while only its first 4 KiB reach the log and its
/// last lines a trap message.
pub(crate) const MAX_OUTPUT_BYTES: usize = 1 << 20;

/// The limits of each call of one plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Fuel per call.
    pub fuel: u64,
    /// Wall-clock deadline per call.
    pub deadline: Duration,
    /// Linear memory cap per call, in bytes.
    pub memory_bytes: usize,
    /// Result size cap, in bytes of JSON.
    pub result_bytes: usize,
    /// Captured stdout/stderr per stream, in bytes.
    pub output_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: DEFAULT_FUEL,
            deadline: DEFAULT_DEADLINE,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            result_bytes: DEFAULT_RESULT_BYTES,
            output_bytes: DEFAULT_OUTPUT_BYTES,
        }
    }
}
