//! Plugins: WebAssembly components loaded once and called by name with JSON.
//!
//! [`Plugin::load`] compiles a component (or takes it from the on-disk
//! cache), checks that every export has a JSON form and that it imports
//! nothing but WASI 0.2 and the callme host interface, and pre-instantiates
//! it. [`Plugin::call`] then runs one function in a fresh store and
//! instance with the plugin's [`Limits`]; [`Plugin::session`] keeps one
//! instance for several calls (the baseline the fresh-sandbox cost is
//! measured against).
//!
//! # Layout
//!
//! - `engine`: the shared [`Runtime`] (engine, linker, epoch ticker).
//! - `instances`: where a call's store and instance come from (new, a
//!   spare made ahead of time, or kept from an earlier call), and the
//!   runtime-wide cap on instances alive at once.
//! - `limits`: per-call [`Limits`] and their defaults.
//! - `sandbox`: the store data of one call (WASI with nothing granted, memory limiter, host imports).
//! - `output`: bounded capture of guest stdout/stderr.
//! - `value`: the JSON <-> WIT value mapping.
//! - `signature`: WIT signatures as text.

mod engine;
mod instances;
mod limits;
mod output;
mod sandbox;
mod signature;
mod value;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use wasmtime::component::{
    Component, ComponentExportIndex, Instance, Type, Val, types::ComponentItem,
};
use wasmtime::{Store, Trap};

pub use engine::{DEFAULT_MAX_INSTANCES, EPOCH_TICK, Runtime, RuntimeConfig, default_cache_dir};
pub use instances::RuntimeStats;
pub use limits::{
    DEFAULT_DEADLINE, DEFAULT_FUEL, DEFAULT_MEMORY_BYTES, DEFAULT_OUTPUT_BYTES, DEFAULT_PREWARM,
    DEFAULT_RESULT_BYTES, GuestLogLevel, Limits,
};

use crate::protocol::Args;
use crate::{PluginError, TimeoutCause};
use instances::{Instances, Sandbox};
use sandbox::CallState;
use signature::{func_signature, type_name, unsupported};
use value::{Budget, Mismatch, from_json, placeholder, to_json};

/// The name and WIT signature of a callable function.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FunctionInfo {
    /// The name a caller uses: `add`, or `stats.mean` for a function of an
    /// exported interface.
    pub name: String,
    /// The WIT signature, e.g. `func(a: s64, b: s64) -> s64`.
    pub signature: String,
}

struct Export {
    info: FunctionInfo,
    index: ComponentExportIndex,
    params: Vec<(String, Type)>,
    results: Vec<Type>,
}

/// A loaded, validated, pre-instantiated plugin.
pub struct Plugin {
    hash: String,
    exports: BTreeMap<String, Export>,
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

/// Lower-case hex SHA-256 of `bytes`: the version of a plugin.
pub fn content_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in digest {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The short name of an exported interface: `stats` for both the inline
/// `stats` and `example:calc/stats@1.0.0`.
fn interface_short_name(name: &str) -> &str {
    let tail = name.rsplit_once('/').map_or(name, |(_, t)| t);
    tail.split_once('@').map_or(tail, |(h, _)| h)
}

/// Whether a plugin may import `name`: WASI 0.2 or the callme host interface.
fn import_allowed(name: &str) -> bool {
    let (path, version) = name.split_once('@').unwrap_or((name, ""));
    (path.starts_with("wasi:") && version.starts_with("0.2."))
        || (path == "callme:plugin/host" && version.starts_with("0.1."))
}

impl Plugin {
    /// Loads a plugin from a file; its name is the file stem.
    ///
    /// # Errors
    ///
    /// [`PluginError::InvalidPlugin`] when the file cannot be read or the
    /// component is refused (see [`Plugin::load`]).
    pub fn load_file(
        runtime: &Runtime,
        path: &Path,
        limits: Limits,
    ) -> Result<Plugin, PluginError> {
        let bytes = std::fs::read(path).map_err(|e| {
            PluginError::invalid_plugin(format!("cannot read {}: {e}", path.display()))
        })?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "plugin".into());
        Plugin::load(runtime, &name, &bytes, limits)
    }

    /// Loads a plugin from component bytes.
    ///
    /// # Errors
    ///
    /// [`PluginError::InvalidPlugin`] when the bytes are not a valid
    /// component, an export uses a type without a JSON form (naming the
    /// function and the type), it imports anything but WASI 0.2 and
    /// `callme:plugin/host` (naming the import), or it cannot be linked.
    pub fn load(
        runtime: &Runtime,
        name: &str,
        bytes: &[u8],
        limits: Limits,
    ) -> Result<Plugin, PluginError> {
        let rt = &runtime.inner;
        if limits.memory_bytes > rt.config.max_memory_bytes {
            return Err(PluginError::invalid_plugin(format!(
                "memory cap of {} bytes exceeds the runtime's maximum of {}",
                limits.memory_bytes, rt.config.max_memory_bytes
            )));
        }
        let hash = content_hash(bytes);
        // One line, and nothing of the file: the parser's message quotes
        // the bytes of a file that is not WebAssembly at all (a text file,
        // or whatever a symlink points at), and the message goes to logs
        // and to callers.
        let component = Component::new(&rt.engine, bytes).map_err(|e| {
            PluginError::invalid_plugin(if bytes.starts_with(b"\0asm") {
                format!("not a valid component: {e:#}").replace('\n', " ")
            } else {
                format!(
                    "not a WebAssembly component ({} bytes that do not start with `\\0asm`)",
                    bytes.len()
                )
            })
        })?;
        let ty = component.component_type();

        for (import, _) in ty.imports(&rt.engine) {
            if !import_allowed(import) {
                return Err(PluginError::invalid_plugin(format!(
                    "imports `{import}`, which the host does not provide (plugins may import \
                     WASI 0.2 and callme:plugin/host@0.1.0)"
                )));
            }
        }

        let mut exports = BTreeMap::new();
        for (export_name, item) in ty.exports(&rt.engine) {
            match item.ty {
                ComponentItem::ComponentFunc(func) => {
                    let index = component
                        .get_export_index(None, export_name)
                        .ok_or_else(|| PluginError::internal(format!("export `{export_name}`")))?;
                    let e = describe(export_name.to_string(), index, &func)?;
                    exports.insert(e.info.name.clone(), e);
                }
                // Toolchain plumbing, not the author's functions:
                // componentize-py exports its interpreter set-up as a bare
                // `exports` instance (so a plugin cannot name its own
                // interface `exports`).
                ComponentItem::ComponentInstance(_)
                    if export_name.starts_with("componentize-py:") || export_name == "exports" => {}
                ComponentItem::ComponentInstance(inst) => {
                    let short = interface_short_name(export_name);
                    let inst_index = component
                        .get_export_index(None, export_name)
                        .ok_or_else(|| PluginError::internal(format!("export `{export_name}`")))?;
                    for (func_name, item) in inst.exports(&rt.engine) {
                        if let ComponentItem::ComponentFunc(func) = item.ty {
                            let index = component
                                .get_export_index(Some(&inst_index), func_name)
                                .ok_or_else(|| {
                                    PluginError::internal(format!("export `{func_name}`"))
                                })?;
                            let e = describe(format!("{short}.{func_name}"), index, &func)?;
                            exports.insert(e.info.name.clone(), e);
                        }
                    }
                }
                _ => {}
            }
        }

        let pre = rt
            .linker
            .instantiate_pre(&component)
            .map_err(|e| PluginError::invalid_plugin(format!("cannot be linked: {e:#}")))?;
        let weight = runtime.slots_for(&component)?;
        Ok(Plugin {
            hash,
            exports,
            instances: Instances::new(runtime.clone(), name.into(), limits, pre, weight),
        })
    }

    /// The plugin's name (its server id when served).
    pub fn name(&self) -> &str {
        &self.instances.name
    }

    /// SHA-256 of the component bytes, hex.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The per-call limits.
    pub fn limits(&self) -> &Limits {
        &self.instances.limits
    }

    /// Every callable function, sorted by name.
    pub fn functions(&self) -> Vec<FunctionInfo> {
        self.exports.values().map(|e| e.info.clone()).collect()
    }

    /// Calls `func` in a fresh sandbox.
    ///
    /// # Errors
    ///
    /// Every [`PluginError`] but `InvalidPlugin`: the function does not
    /// exist, the arguments do not fit, the call ran into a limit, the
    /// guest trapped, or it returned `result::err`. A call that finds
    /// every instance slot of the runtime in a call waits for one, and
    /// fails with `Timeout` if none is free within its deadline.
    pub async fn call(&self, func: &str, args: &Args) -> Result<Value, PluginError> {
        let export = self.export(func)?;
        let params = bind_args(export, args)?;
        let instances = &self.instances;
        let mut sandbox = instances.sandbox().await?;
        let started = Instant::now();
        let instance = sandbox.instance.take();
        let outcome = {
            let store = &mut sandbox.store;
            instances
                .with_deadline(async move {
                    let instance = match instance {
                        Some(i) => i,
                        None => instances.pre().instantiate_async(&mut *store).await?,
                    };
                    let results = invoke(store, &instance, export, &params).await?;
                    Ok((instance, results))
                })
                .await
        };
        // Only an instance whose call returned may be kept for another.
        let (instance, outcome) = match outcome {
            Ok(Ok((instance, results))) => (Some(instance), Ok(Ok(results))),
            Ok(Err(e)) => (None, Ok(Err(e))),
            Err(limit) => (None, Err(limit)),
        };
        let result = self.finish(&sandbox.store, export, outcome, started);
        sandbox.instance = instance;
        instances.give_back(sandbox);
        result
    }

    /// Starts keeping the spare instances the plugin's `prewarm` setting
    /// asks for, made on `handle` (see [`Limits::prewarm`]). A server does
    /// this for each plugin it serves; one-shot users need not.
    pub fn start_prewarm(&self, handle: &tokio::runtime::Handle) {
        self.instances.start_prewarm(handle);
    }

    /// Spare instances ready for calls right now.
    pub fn spares(&self) -> usize {
        self.instances.spares()
    }

    /// Checks `args` against `func`'s parameters without calling it.
    ///
    /// # Errors
    ///
    /// [`PluginError::NoSuchFunction`] or [`PluginError::InvalidArguments`],
    /// exactly as [`Plugin::call`] would report them.
    pub fn check_args(&self, func: &str, args: &Args) -> Result<(), PluginError> {
        bind_args(self.export(func)?, args).map(drop)
    }

    /// Starts a session: one instance that serves several calls in
    /// sequence. Limits still apply per call; the session must be dropped
    /// after any error, since the guest may be left in a broken state.
    ///
    /// # Errors
    ///
    /// As [`Plugin::call`], for the instantiation.
    pub async fn session(&self) -> Result<Session<'_>, PluginError> {
        let mut sandbox = self.instances.fresh_sandbox().await?;
        let instance = self
            .instances
            .pre()
            .instantiate_async(&mut sandbox.store)
            .await
            .map_err(|e| classify(e, sandbox.store.data()))?;
        Ok(Session {
            plugin: self,
            sandbox: Some(sandbox),
            instance,
        })
    }

    fn export(&self, func: &str) -> Result<&Export, PluginError> {
        self.exports
            .get(func)
            .ok_or_else(|| PluginError::NoSuchFunction {
                name: func.to_string(),
                available: self.exports.keys().cloned().collect(),
            })
    }

    fn finish(
        &self,
        store: &Store<CallState>,
        export: &Export,
        outcome: Result<wasmtime::Result<Vec<Val>>, Duration>,
        started: Instant,
    ) -> Result<Value, PluginError> {
        let state = store.data();
        let elapsed = started.elapsed();
        let result = match outcome {
            Err(limit) => Err(PluginError::Timeout {
                cause: TimeoutCause::Deadline,
                message: format!(
                    "the call ran past its deadline of {limit:?} (blocked in a host call)"
                ),
            }),
            Ok(Err(e)) => Err(classify(e, state)),
            Ok(Ok(results)) => self.convert_results(export, &results),
        };
        state.log_output();
        let func = &export.info.name;
        match &result {
            Ok(_) => {
                tracing::debug!(target: "callme::plugin", plugin = &*self.instances.name, func, ?elapsed, "call")
            }
            Err(e) => {
                tracing::debug!(target: "callme::plugin", plugin = &*self.instances.name, func, ?elapsed, error = %e, "call failed")
            }
        }
        result
    }

    fn convert_results(&self, export: &Export, results: &[Val]) -> Result<Value, PluginError> {
        let cap = self.instances.limits.result_bytes;
        let mut budget = Budget::new(cap);
        let too_large = |_| PluginError::MemoryLimit {
            message: format!("the result exceeds the result size cap of {cap} bytes"),
        };
        match (export.results.as_slice(), results) {
            ([], _) => Ok(Value::Null),
            // A top-level `result` is the function's own success or
            // failure: `ok` is the call's result, `err` a GuestError.
            ([Type::Result(r)], [Val::Result(v)]) => match v {
                Ok(payload) => match (r.ok(), payload) {
                    (Some(t), Some(p)) => to_json(&t, p, &mut budget).map_err(too_large),
                    _ => Ok(Value::Null),
                },
                Err(payload) => {
                    let data = match (r.err(), payload) {
                        (Some(t), Some(p)) => to_json(&t, p, &mut budget).map_err(too_large)?,
                        _ => Value::Null,
                    };
                    let message = match &data {
                        Value::String(s) => s.clone(),
                        Value::Null => "the function returned an error".into(),
                        other => other.to_string(),
                    };
                    Err(PluginError::GuestError {
                        message,
                        payload: data,
                    })
                }
            },
            ([t], [v]) => to_json(t, v, &mut budget).map_err(too_large),
            (types, values) => {
                let mut out = Vec::new();
                for (t, v) in types.iter().zip(values) {
                    out.push(to_json(t, v, &mut budget).map_err(too_large)?);
                }
                Ok(Value::Array(out))
            }
        }
    }
}

/// One instance serving several calls in sequence; see [`Plugin::session`].
pub struct Session<'a> {
    plugin: &'a Plugin,
    /// The store with its instance slot; `None` once a call failed.
    sandbox: Option<Sandbox>,
    instance: Instance,
}

impl Session<'_> {
    /// Calls `func` in this session's instance.
    ///
    /// # Errors
    ///
    /// As [`Plugin::call`]. After an error other than `NoSuchFunction` or
    /// `InvalidArguments` the session is spent and every later call fails.
    pub async fn call(&mut self, func: &str, args: &Args) -> Result<Value, PluginError> {
        let plugin = self.plugin;
        let export = plugin.export(func)?;
        let params = bind_args(export, args)?;
        let mut sandbox = self.sandbox.take().ok_or_else(|| {
            PluginError::internal("this session ended after an earlier error".to_string())
        })?;
        plugin.instances.arm(&mut sandbox.store);
        let started = Instant::now();
        let instance = self.instance;
        let outcome = {
            let store = &mut sandbox.store;
            plugin
                .instances
                .with_deadline(async move { invoke(store, &instance, export, &params).await })
                .await
        };
        match outcome {
            Ok(Ok(results)) => {
                let result = plugin.convert_results(export, &results);
                sandbox.store.data().log_output();
                self.sandbox = Some(sandbox);
                result
            }
            other => plugin.finish(&sandbox.store, export, other, started),
        }
    }
}

async fn invoke(
    store: &mut Store<CallState>,
    instance: &Instance,
    export: &Export,
    params: &[Val],
) -> wasmtime::Result<Vec<Val>> {
    let func = instance
        .get_func(&mut *store, export.index)
        .ok_or_else(|| wasmtime::format_err!("export `{}` is not a function", export.info.name))?;
    let mut results = vec![placeholder(); export.results.len()];
    func.call_async(&mut *store, params, &mut results).await?;
    Ok(results)
}

fn describe(
    name: String,
    index: ComponentExportIndex,
    func: &wasmtime::component::types::ComponentFunc,
) -> Result<Export, PluginError> {
    let params: Vec<(String, Type)> = func.params().map(|(n, t)| (n.to_string(), t)).collect();
    let results: Vec<Type> = func.results().collect();
    for (pname, t) in &params {
        if let Some(bad) = unsupported(t) {
            return Err(PluginError::invalid_plugin(format!(
                "function `{name}`: parameter `{pname}` has type {}, which has no JSON form",
                type_name(&bad)
            )));
        }
    }
    for t in &results {
        if let Some(bad) = unsupported(t) {
            return Err(PluginError::invalid_plugin(format!(
                "function `{name}`: its result has type {}, which has no JSON form",
                type_name(&bad)
            )));
        }
    }
    if func.async_() {
        return Err(PluginError::invalid_plugin(format!(
            "function `{name}` is an async component function, which the host does not call yet"
        )));
    }
    Ok(Export {
        info: FunctionInfo {
            signature: func_signature(func),
            name,
        },
        index,
        params,
        results,
    })
}

/// Binds positional and keyword arguments to the function's parameters.
fn bind_args(export: &Export, args: &Args) -> Result<Vec<Val>, PluginError> {
    let params = &export.params;
    let fname = &export.info.name;
    let invalid = |message: String| PluginError::InvalidArguments {
        message: format!("{fname}: {message}"),
    };
    if args.args.len() > params.len() {
        return Err(invalid(format!(
            "takes {} argument{} ({}), got {}",
            params.len(),
            if params.len() == 1 { "" } else { "s" },
            export.info.signature,
            args.args.len()
        )));
    }
    if let Some(unknown) = args
        .kwargs
        .keys()
        .find(|k| !params.iter().any(|(n, _)| n == *k))
    {
        return Err(invalid(format!(
            "unknown keyword argument `{unknown}` ({})",
            export.info.signature
        )));
    }
    let mut vals = Vec::with_capacity(params.len());
    for (i, (pname, ty)) in params.iter().enumerate() {
        let json = match (args.args.get(i), args.kwargs.get(pname)) {
            (Some(_), Some(_)) => {
                return Err(invalid(format!(
                    "argument `{pname}` given both by position and by keyword"
                )));
            }
            (Some(v), None) | (None, Some(v)) => v,
            (None, None) => {
                return Err(invalid(format!(
                    "missing argument `{pname}` of type {} ({})",
                    type_name(ty),
                    export.info.signature
                )));
            }
        };
        let val = from_json(ty, json, pname).map_err(|Mismatch { path, message }| {
            invalid(format!("argument `{path}`: {message}"))
        })?;
        vals.push(val);
    }
    Ok(vals)
}

/// Turns a wasmtime error from instantiation or a call into a [`PluginError`].
fn classify(error: wasmtime::Error, state: &CallState) -> PluginError {
    if let Some((current, desired)) = state.limiter.refused {
        return PluginError::MemoryLimit {
            message: format!(
                "linear memory would grow from {current} to {desired} bytes, over the cap"
            ),
        };
    }
    let stderr = state.stderr.text();
    let guest_said = last_lines(&stderr, 20);
    match error.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => PluginError::Timeout {
            cause: TimeoutCause::Fuel,
            message: "the call ran out of fuel".into(),
        },
        Some(Trap::Interrupt) if state.deadline_hit => PluginError::Timeout {
            cause: TimeoutCause::Deadline,
            message: "the call ran past its deadline".into(),
        },
        Some(trap) => {
            let mut message = format!("{trap}");
            if !guest_said.is_empty() {
                message.push_str("; guest stderr: ");
                message.push_str(&guest_said);
            }
            PluginError::Trap { message }
        }
        None => {
            let text = format!("{error:#}");
            if text.contains("instance limit") || text.contains("maximum concurrent") {
                PluginError::internal(format!("no sandbox available: {text}"))
            } else {
                let mut message = text;
                if !guest_said.is_empty() {
                    message.push_str("; guest stderr: ");
                    message.push_str(&guest_said);
                }
                PluginError::Trap { message }
            }
        }
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interface_names_are_short() {
        assert_eq!(interface_short_name("stats"), "stats");
        assert_eq!(interface_short_name("example:calc/stats@1.0.0"), "stats");
        assert_eq!(interface_short_name("example:calc/stats"), "stats");
    }

    #[test]
    fn only_wasi_02_and_host_imports_are_allowed() {
        assert!(import_allowed("wasi:cli/environment@0.2.6"));
        assert!(import_allowed("callme:plugin/host@0.1.0"));
        assert!(!import_allowed("wasi:cli/environment@0.3.0"));
        assert!(!import_allowed("evil"));
        assert!(!import_allowed("callme:plugin/other@0.1.0"));
    }

    #[test]
    fn content_hash_is_sha256_hex() {
        assert_eq!(
            content_hash(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
