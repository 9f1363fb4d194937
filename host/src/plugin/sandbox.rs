//! The state of one call's sandbox: WASI context with nothing granted, memory limiter, host imports.
//!
//! A [`CallState`] lives in a fresh wasmtime store for exactly one call (or
//! one reused instance). WASI is built with no preopened directories, no
//! environment, no arguments, no network and an empty stdin; stdout and
//! stderr are captured. The limiter enforces the plugin's memory cap and
//! remembers that it refused, so a guest that aborts after a failed
//! allocation is reported as `MemoryLimit`, not as a plain trap.

use std::sync::Arc;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::limits::GuestLogLevel;
use super::output::CapturedOutput;

/// Host bindings of `wit/callme.wit`.
pub(crate) mod host_bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "callme:plugin/plugin",
    });
}

use host_bindings::callme::plugin::host::{Host, Level};

/// Tables are small in every guest we know (function tables); this bounds
/// a guest that grows one without end.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// Store data of one sandbox.
pub(crate) struct CallState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) plugin: Arc<str>,
    pub(crate) stdout: CapturedOutput,
    pub(crate) stderr: CapturedOutput,
    /// Set when the epoch callback stopped the guest at its deadline.
    pub(crate) deadline_hit: bool,
    pub(crate) log_level: GuestLogLevel,
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
        // Nothing is granted: the builder's defaults are a closed stdin, no
        // env, no args, no preopens, and every socket address denied.
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_ip_name_lookup(false)
            .allow_tcp(false)
            .allow_udp(false)
            .build();
        CallState {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter {
                cap: memory_bytes,
                refused: None,
            },
            plugin,
            stdout,
            stderr,
            deadline_hit: false,
            log_level,
        }
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
        if wanted < self.log_level {
            return;
        }
        let plugin = &*self.plugin;
        match level {
            Level::Trace => tracing::trace!(target: "callme::plugin", plugin, "{message}"),
            Level::Debug => tracing::debug!(target: "callme::plugin", plugin, "{message}"),
            Level::Info => tracing::info!(target: "callme::plugin", plugin, "{message}"),
            Level::Warn => tracing::warn!(target: "callme::plugin", plugin, "{message}"),
            Level::Error => tracing::error!(target: "callme::plugin", plugin, "{message}"),
        }
    }
}

/// Caps linear memory and remembers the growth it refused.
pub(crate) struct MemoryLimiter {
    cap: usize,
    /// `(current, desired)` of the first refused growth.
    pub(crate) refused: Option<(usize, usize)>,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.refused.get_or_insert((current, desired));
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}
