//! The state of one call's sandbox: WASI context with nothing granted, memory limiter, host imports, capabilities, what reaches the log.
//!
//! A [`CallState`] lives in a fresh wasmtime store for exactly one call (or
//! one reused instance). WASI is built with no preopened directories, no
//! environment, no arguments, no network and an empty stdin; stdout and
//! stderr are captured. The limiter enforces the plugin's memory cap, on
//! all of the store's linear memories together, and remembers that it
//! refused, so a guest that aborts after a failed
//! allocation is reported as `MemoryLimit`, not as a plain trap.
//!
//! Callers choose what a guest prints and logs, and the host's log is
//! shared by every plugin and caller, so each call gets a bounded share of
//! it: one line per captured stream ([`CallState::log_output`]) and a few
//! `host.log` records, then a count of what was dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::caps::CallCaps;
use super::clock::CallClock;
use super::engine::{
    MAX_CORE_INSTANCES_PER_COMPONENT, MAX_MEMORIES_PER_COMPONENT, MAX_TABLE_ELEMENTS,
    MAX_TABLES_PER_COMPONENT,
};
use super::log_rate::{self, Admit};
use super::output::{CapturedOutput, Excerpt, LOG_RECORD_BYTES, one_line};
use super::settings::GuestLogLevel;
use super::trap::MemoryRefused;

/// Host bindings of `wit/callme.wit` (0.1.0; 0.2.0 is in `caps`).
pub(crate) mod host_bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "callme:plugin/plugin",
    });
}

use host_bindings::callme::plugin::host::{Host, Level};

/// Most random bytes a guest gets in one call to `wasi:random`.
const MAX_RANDOM_BYTES: u64 = 1 << 20;

/// Handles one store may hold in the host's resource table (WASI
/// streams, pollables, `wasi:http` requests, bodies and headers, ...):
/// far more than any guest keeps at once (a request in flight takes about
/// ten), and few enough that what the host holds behind them stays
/// bounded (see `caps::http`). wasmtime's own default is 1,000,000.
pub(crate) const MAX_HOST_HANDLES: usize = 4096;

/// `host.log` records one call may write: enough for a guest's account of
/// what it did, too few to flood the log.
const MAX_GUEST_LOG_RECORDS: usize = 16;

/// Message text those records may carry in all, the same as one line of
/// captured output.
const GUEST_LOG_BYTES: usize = LOG_RECORD_BYTES;

/// What one call has logged through `host.log` so far. Atomics only
/// because the call's end is seen through a shared reference to the store.
#[derive(Default)]
struct GuestLogBudget {
    records: AtomicUsize,
    bytes: AtomicUsize,
    dropped: AtomicUsize,
}

/// Store data of one sandbox.
pub(crate) struct CallState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) plugin: Arc<str>,
    pub(crate) stdout: CapturedOutput,
    pub(crate) stderr: CapturedOutput,
    pub(crate) log_level: GuestLogLevel,
    /// The guest's monotonic clock, which stands still while a spare
    /// waits for its call.
    pub(crate) clock: CallClock,
    /// What the sidecar grants and the call being served brings.
    pub(crate) caps: CallCaps,
    guest_log: GuestLogBudget,
    /// How much the guest may hand the host at once, as its calls go.
    pub(crate) transfers: super::hostcall::Transfers,
}

impl CallState {
    pub(crate) fn new(
        plugin: Arc<str>,
        memory_bytes: usize,
        output_bytes: usize,
        log_level: GuestLogLevel,
    ) -> Self {
        let stdout = CapturedOutput::new(output_bytes);
        let stderr = CapturedOutput::new(output_bytes);
        let clock = CallClock::new();
        // Nothing is granted: the builder's defaults are a closed stdin, no
        // env, no args, no preopens, and every socket address denied.
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .monotonic_clock(clock.clone())
            .allow_ip_name_lookup(false)
            .allow_tcp(false)
            .allow_udp(false)
            // Random bytes are made on the host before the guest gets
            // them, and held while they are copied in: at most 1 MiB at
            // once (wasmtime's default is 64 MiB whatever the cap), which
            // no guest's source of randomness asks for (wasi-libc's
            // `getentropy` takes 256 bytes).
            .max_random_size(MAX_RANDOM_BYTES.min(u64::try_from(memory_bytes).unwrap_or(u64::MAX)))
            .build();
        CallState {
            wasi,
            table: {
                let mut table = ResourceTable::new();
                table.set_max_capacity(MAX_HOST_HANDLES);
                table
            },
            limiter: MemoryLimiter::new(memory_bytes),
            plugin,
            stdout,
            stderr,
            log_level,
            clock,
            caps: CallCaps::default(),
            guest_log: GuestLogBudget::default(),
            transfers: super::hostcall::Transfers::default(),
        }
    }

    /// Ends a call's share of the log: one line for each captured stream
    /// that has something to say, and one for the `host.log` records over
    /// the budget. The next call (of a reused instance) starts afresh.
    pub(crate) fn log_output(&self) {
        let plugin = &*self.plugin;
        let written = tracing::enabled!(target: "callme::plugin", tracing::Level::INFO);
        for (stream, out) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            if self.log_level > GuestLogLevel::Info || !written {
                out.clear();
                continue;
            }
            let Some(Excerpt {
                line,
                dropped_bytes,
                dropped_lines,
            }) = out.take_excerpt()
            else {
                continue;
            };
            if !may_log(&self.plugin, line.len()) {
                continue;
            }
            if dropped_bytes == 0 {
                tracing::info!(target: "callme::plugin", plugin, stream, "{line}");
            } else {
                tracing::info!(target: "callme::plugin", plugin, stream, dropped_bytes, dropped_lines, "{line} …");
            }
        }
        let budget = &self.guest_log;
        budget.records.store(0, Ordering::Relaxed);
        budget.bytes.store(0, Ordering::Relaxed);
        let dropped = budget.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 && may_log(&self.plugin, 100) {
            tracing::warn!(
                target: "callme::plugin",
                plugin,
                dropped,
                "{dropped} more guest log records dropped: a call may log {MAX_GUEST_LOG_RECORDS} records, {GUEST_LOG_BYTES} bytes in all"
            );
        }
    }
}

/// Whether a line of `len` bytes of `plugin`'s guest text goes to the log
/// now ([`log_rate`]); says first how many were held back, if any were.
fn may_log(plugin: &Arc<str>, len: usize) -> bool {
    match log_rate::admit(plugin, len) {
        Admit::Yes => true,
        Admit::After { lines, bytes } => {
            tracing::warn!(
                target: "callme::plugin",
                plugin = &**plugin,
                held_back_lines = lines,
                held_back_bytes = bytes,
                "{lines} guest lines ({bytes} bytes) held back: a plugin's output may take {} KiB of the log a second ({} KiB at once)",
                log_rate::BYTES_PER_SECOND >> 10,
                log_rate::BURST_BYTES >> 10,
            );
            true
        }
        Admit::No => false,
    }
}

/// Emits a `tracing` event at a guest's log level.
macro_rules! guest_event {
    ($level:expr, $($rest:tt)+) => {
        match $level {
            Level::Trace => tracing::trace!($($rest)+),
            Level::Debug => tracing::debug!($($rest)+),
            Level::Info => tracing::info!($($rest)+),
            Level::Warn => tracing::warn!($($rest)+),
            Level::Error => tracing::error!($($rest)+),
        }
    };
}

/// Whether the host's log filter writes a guest line at `level` (in the
/// span of the call at hand).
fn guest_enabled(level: Level) -> bool {
    match level {
        Level::Trace => tracing::enabled!(target: "callme::plugin", tracing::Level::TRACE),
        Level::Debug => tracing::enabled!(target: "callme::plugin", tracing::Level::DEBUG),
        Level::Info => tracing::enabled!(target: "callme::plugin", tracing::Level::INFO),
        Level::Warn => tracing::enabled!(target: "callme::plugin", tracing::Level::WARN),
        Level::Error => tracing::enabled!(target: "callme::plugin", tracing::Level::ERROR),
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl Host for CallState {
    fn log(&mut self, level: Level, message: String) {
        let wanted = match level {
            Level::Trace => GuestLogLevel::Trace,
            Level::Debug => GuestLogLevel::Debug,
            Level::Info => GuestLogLevel::Info,
            Level::Warn => GuestLogLevel::Warn,
            Level::Error => GuestLogLevel::Error,
        };
        if wanted < self.log_level || !guest_enabled(level) {
            // Not kept by the plugin's settings, or not written by the
            // host's filter: a line nobody will read takes nothing of
            // the call's share or the plugin's rate.
            return;
        }
        let budget = &mut self.guest_log;
        let records = budget.records.get_mut();
        let bytes = budget.bytes.get_mut();
        let (line, dropped_bytes) = if *records < MAX_GUEST_LOG_RECORDS {
            one_line(&message, GUEST_LOG_BYTES.saturating_sub(*bytes))
        } else {
            (String::new(), message.len())
        };
        if line.is_empty() && dropped_bytes > 0 {
            *budget.dropped.get_mut() += 1;
            return;
        }
        *records += 1;
        *bytes += line.len();
        if !may_log(&self.plugin, line.len()) {
            return;
        }
        let plugin = &*self.plugin;
        if dropped_bytes == 0 {
            guest_event!(level, target: "callme::plugin", plugin, "{line}");
        } else {
            guest_event!(level, target: "callme::plugin", plugin, dropped_bytes, "{line} …");
        }
    }
}

/// Caps the linear memories of a store, all of them together (a
/// component may have one per core module), and remembers the growth it
/// refused.
pub(crate) struct MemoryLimiter {
    cap: usize,
    /// Bytes of every memory of the store so far: each one's growth is
    /// counted from 0 as it is made.
    total: usize,
    /// The growth last allowed, taken back if it then failed.
    pending: usize,
    /// The first growth it refused (since the store was last armed).
    pub(crate) refused: Option<MemoryRefused>,
}

impl MemoryLimiter {
    pub(crate) fn new(cap: usize) -> MemoryLimiter {
        MemoryLimiter {
            cap,
            total: 0,
            pending: 0,
            refused: None,
        }
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let grows = desired.saturating_sub(current);
        let total = self.total.saturating_add(grows);
        if total > self.cap {
            // Reported as that memory's sizes plus the others', so the
            // message speaks of the store's memory as a whole.
            let others = self.total.saturating_sub(current);
            self.refused.get_or_insert(MemoryRefused {
                current: others.saturating_add(current),
                desired: others.saturating_add(desired),
            });
            return Ok(false);
        }
        self.total = total;
        self.pending = grows;
        Ok(true)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.total = self.total.saturating_sub(std::mem::take(&mut self.pending));
        tracing::debug!(target: "callme::plugin", error = %error, "memory growth failed");
        Ok(())
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    // The counts and sizes the pool holds every instance to, held here
    // too, for instances made without it (a host short of address
    // space): wasmtime's own defaults are 10,000 of each a store, so a
    // guest's tables alone could take gigabytes outside `memory_bytes`.
    fn tables(&self) -> usize {
        MAX_TABLES_PER_COMPONENT as usize
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES_PER_COMPONENT as usize
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES_PER_COMPONENT as usize
    }
}
