//! Plugins: WebAssembly components loaded once and called by name with JSON.
//!
//! [`Plugin::load`] compiles a component (or takes it from the on-disk
//! cache), checks that every export has a JSON form and that it imports
//! nothing but WASI 0.2 and the callme host interface, and pre-instantiates
//! it. [`Plugin::call`] then runs one function in a fresh store and
//! instance under the plugin's [`Limits`]; [`Plugin::session`] keeps one
//! instance for several calls (the baseline the fresh-sandbox cost is
//! measured against).
//!
//! # Layout
//!
//! - `engine`: the shared [`Runtime`] (engine, linker, epoch ticker).
//! - `load`: reading, checking and linking a component into a [`Plugin`].
//! - `export`: one callable function, its [`FunctionInfo`] and types.
//! - `call`: one call, fresh or in a [`Session`], from sandbox to result.
//! - `bind`: a call's JSON arguments bound to the function's parameters.
//! - `trap`: why a call stopped: which limit, or which guest fault.
//! - `settings`: [`PluginSettings`], from the sidecar `NAME.toml`.
//! - `limits`: the per-call [`Limits`] and their defaults and bounds.
//! - `instances`: where a call's store and instance come from (new, a
//!   spare made ahead of time, or kept from an earlier call), and the
//!   runtime-wide cap on instances alive at once.
//! - `sandbox`: the store data of one call (WASI with nothing granted, memory limiter, host imports).
//! - `caps`: what a sidecar may grant (`config`, `rpc`: the imports of
//!   `callme:plugin@0.2.0`) and what one call brings ([`CallContext`]).
//! - `output`: bounded capture of guest stdout/stderr.
//! - `value`: the JSON <-> WIT value mapping.
//! - `signature`: WIT signatures as text.

mod bind;
mod cache;
mod call;
mod caps;
mod clock;
mod engine;
mod export;
mod hostcall;
mod instances;
mod limits;
mod load;
mod log_rate;
mod maker;
mod output;
mod sandbox;
mod settings;
mod signature;
mod trap;
mod value;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use call::Session;
pub use caps::{
    CallContext, Capabilities, Config, ConfigError, ConfigValue, DEFAULT_HTTP_MAX_RESPONSE_BYTES,
    DEFAULT_HTTP_TIMEOUT, DEFAULT_MAX_CALL_DEPTH, HttpGrant, InvalidGrant, InvalidHost, RpcGrant,
};
pub use engine::{DEFAULT_MAX_INSTANCES, EPOCH_TICK, Runtime, RuntimeConfig, default_cache_dir};
pub use export::FunctionInfo;
pub use instances::RuntimeStats;
pub use limits::{
    DEFAULT_DEADLINE, DEFAULT_FUEL, DEFAULT_MEMORY_BYTES, DEFAULT_OUTPUT_BYTES,
    DEFAULT_RESULT_BYTES, Limits,
};
pub(crate) use limits::{MAX_DEADLINE, YIELD_EVERY_FUEL};
pub use load::content_hash;
pub use settings::{DEFAULT_PREWARM, GuestLogLevel, PluginSettings};

use crate::PluginError;
use crate::protocol::Args;
use bind::bind_args;
use export::Export;
use instances::Instances;

/// A loaded, validated, pre-instantiated plugin.
pub struct Plugin {
    hash: String,
    exports: BTreeMap<String, Export>,
    /// The capabilities it imports, sorted: `config`, `http`, `rpc`.
    capabilities: Vec<&'static str>,
    instances: Arc<Instances>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin")
            .field("name", &self.instances.name)
            .field("hash", &self.hash)
            .field("functions", &self.exports.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Plugin {
    /// The plugin's name (its server id when served).
    pub fn name(&self) -> &str {
        &self.instances.name
    }

    /// SHA-256 of the component bytes, hex.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The settings it was loaded with: call limits, instance policy,
    /// concurrency, guest log level.
    pub fn settings(&self) -> &PluginSettings {
        &self.instances.settings
    }

    /// Every callable function, sorted by name.
    pub fn functions(&self) -> Vec<FunctionInfo> {
        self.exports.values().map(|e| e.info.clone()).collect()
    }

    /// The capabilities the plugin imports (`config`, `http`, `rpc`), sorted,
    /// whether or not its sidecar grants them.
    pub fn capabilities(&self) -> &[&'static str] {
        &self.capabilities
    }

    /// Whether the plugin has a callable function named `func`.
    pub fn has_function(&self, func: &str) -> bool {
        self.exports.contains_key(func)
    }

    /// Starts keeping the spare instances the plugin's `prewarm` setting
    /// asks for (see [`PluginSettings::prewarm`]), made, and used
    /// instances dropped, on `handle` (a server gives its lowest-priority
    /// thread), except for calls whose [`CallContext::busy`] is set: then
    /// on the runtime of the call. Work `handle` has not started within a
    /// few milliseconds is done on the caller's runtime. A server does
    /// this for each plugin it serves; one-shot users need not.
    pub fn start_prewarm(&self, handle: &tokio::runtime::Handle) {
        self.instances.start_prewarm(handle);
    }

    /// Spare instances ready for calls right now.
    pub fn spares(&self) -> usize {
        self.instances.spares()
    }

    /// Whether a call now would find an instance made ahead: a spare, or
    /// an idle instance with `reuse_instances`. Such a call makes nothing
    /// and, if it returns, drops nothing before it ends.
    pub(crate) fn has_ready_instance(&self) -> bool {
        self.instances.has_ready()
    }

    /// Checks `args` against `func`'s parameters without calling it.
    ///
    /// # Errors
    ///
    /// [`PluginError::NoSuchFunction`] or [`PluginError::InvalidArguments`],
    /// exactly as [`Plugin::call`] would report them.
    pub fn check_args(&self, func: &str, args: &Args) -> Result<(), PluginError> {
        let export = self.export(func)?;
        bind_args(&export.info, &export.params, args).map(drop)
    }

    /// The function a caller named.
    fn export(&self, func: &str) -> Result<&Export, PluginError> {
        self.exports
            .get(func)
            .ok_or_else(|| PluginError::NoSuchFunction {
                // As long as a request: shown cut, as an id is.
                name: crate::protocol::shown_id(func),
                available: self.exports.keys().cloned().collect(),
            })
    }
}
