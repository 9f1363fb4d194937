//! One call of a plugin function: its sandbox, the arguments bound, the function run under the deadline, the outcome as JSON or a typed error.
//!
//! [`Plugin::call`] takes a sandbox from the plugin's instances (a new
//! one, a spare made ahead, or one kept from an earlier call with
//! `reuse_instances`) and gives it back after the call; a [`Session`]
//! holds one sandbox for several calls in sequence. Both end the same way,
//! in `run`: instantiate if the sandbox has no instance yet, call, keep
//! the instance only if the call returned, then map the results (a
//! top-level `result::err` becomes a `GuestError`) or the reason it
//! stopped (see `trap`), and hand the guest's output to the log.

use std::time::Instant;

use serde_json::Value;
use wasmtime::Store;
use wasmtime::component::{Instance, Type, Val};

use super::Plugin;
use super::bind::bind_args;
use super::caps::CallContext;
use super::export::Export;
use super::instances::{Instances, Sandbox};
use super::output::{LOG_RECORD_BYTES, one_line};
use super::sandbox::CallState;
use super::trap::classify;
use super::value::{Budget, json_string_bytes, placeholder, to_json};
use crate::protocol::Args;
use crate::{PluginError, observe};

impl Plugin {
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
        self.call_with(func, args, CallContext::default()).await
    }

    /// Calls `func` in a fresh sandbox, serving a request that brings
    /// `context`: the guest's calls to other servers go through its
    /// proxy, one hop deeper, within this call's deadline.
    ///
    /// # Errors
    ///
    /// As [`Plugin::call`].
    pub async fn call_with(
        &self,
        func: &str,
        args: &Args,
        context: CallContext,
    ) -> Result<Value, PluginError> {
        let export = self.export(func)?;
        let params = bind_args(&export.info, &export.params, args)?;
        let busy = context.busy;
        let mut sandbox = self.instances.sandbox(busy, context.ends_by).await?;
        let result = run(&self.instances, &mut sandbox, export, &params, context).await;
        self.instances.give_back(sandbox, busy);
        result
    }

    /// Starts a session: one instance that serves several calls in
    /// sequence. Limits still apply per call; the session must be dropped
    /// after any error, since the guest may be left in a broken state.
    ///
    /// # Errors
    ///
    /// As [`Plugin::call`], for the instantiation, which has the plugin's
    /// deadline: a start function that spins or blocks ends in `Timeout`.
    pub async fn session(&self) -> Result<Session<'_>, PluginError> {
        let mut sandbox = self.instances.fresh_sandbox().await?;
        let deadline = sandbox.deadline;
        let store = &mut sandbox.store;
        let made = self
            .instances
            .with_deadline(deadline, self.instances.pre().instantiate_async(store))
            .await;
        match made {
            Ok(instance) => sandbox.instance = Some(instance),
            Err(e) => {
                let e = failure(e, sandbox.store.data());
                self.instances.give_back(sandbox, false);
                return Err(e);
            }
        }
        Ok(Session {
            plugin: self,
            sandbox: Some(sandbox),
        })
    }
}

impl Plugin {
    /// Makes one instance, within the plugin's limits and deadline, and
    /// drops it: whether one can be made at all, tried before a version
    /// is served. When no instance slot comes free within the deadline
    /// nothing is learnt, and nothing is held against the plugin.
    ///
    /// # Errors
    ///
    /// How making the instance failed: `MemoryLimit`, `Trap`, `Timeout`
    /// (a start function that spins or blocks).
    pub(crate) async fn try_instance(&self) -> Result<(), PluginError> {
        let Ok(mut sandbox) = self.instances.fresh_sandbox().await else {
            return Ok(());
        };
        let deadline = sandbox.deadline;
        let store = &mut sandbox.store;
        let made = self
            .instances
            .with_deadline(deadline, self.instances.pre().instantiate_async(store))
            .await;
        let outcome = made.map(drop).map_err(|e| failure(e, sandbox.store.data()));
        self.instances.give_back(sandbox, false);
        outcome
    }
}

/// One instance serving several calls in sequence; see [`Plugin::session`].
pub struct Session<'a> {
    plugin: &'a Plugin,
    /// The store with its instance and slot; `None` once a call failed.
    sandbox: Option<Sandbox>,
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
        let params = bind_args(&export.info, &export.params, args)?;
        let mut sandbox = self.sandbox.take().ok_or_else(|| {
            PluginError::internal("this session ended after an earlier error".to_string())
        })?;
        let deadline = Instant::now() + plugin.instances.settings.limits.deadline;
        plugin.instances.arm(&mut sandbox, deadline);
        let context = CallContext::default();
        let result = run(&plugin.instances, &mut sandbox, export, &params, context).await;
        if sandbox.instance.is_some() {
            self.sandbox = Some(sandbox);
        }
        result
    }
}

/// Runs `export` in `sandbox`, whose store is armed for this call,
/// instantiating first if it holds no instance. The sandbox keeps its
/// instance only if the call returned (whatever it returned): a guest
/// stopped part-way may be left in a broken state.
async fn run(
    instances: &Instances,
    sandbox: &mut Sandbox,
    export: &Export,
    params: &[Val],
    context: CallContext,
) -> Result<Value, PluginError> {
    let started = Instant::now();
    let deadline = sandbox.deadline;
    let instance = sandbox.instance.take();
    let store = &mut sandbox.store;
    let granted = &instances.settings.capabilities;
    let fuel = instances.settings.limits.fuel;
    let outcome = instances
        .with_deadline(deadline, async move {
            let instance = match instance {
                Some(i) => i,
                None => {
                    observe::instance_made(&instances.name, observe::Made::Call);
                    let instance = instances.pre().instantiate_async(&mut *store).await?;
                    // Start-up code runs on a tank of its own, as a
                    // spare's does: the call's fuel is the same whether a
                    // spare was ready or not. (Fuel is enabled on the
                    // engine, so setting it cannot fail.)
                    let _ = store.set_fuel(fuel);
                    instance
                }
            };
            // Granted from here, not to start-up code: that of a spare,
            // made before any call, never is, and the guest must not see
            // a difference with whether a spare was ready.
            store.data_mut().caps.begin(granted, context, deadline);
            let results = invoke(store, &instance, export, params).await?;
            Ok((instance, results))
        })
        .await;
    let result = match outcome {
        Ok((instance, results)) => {
            sandbox.instance = Some(instance);
            results_json(export, &results, instances.settings.limits.result_bytes)
        }
        Err(e) => Err(failure(e, sandbox.store.data())),
    };
    sandbox.store.data_mut().caps.end();
    let consumed = fuel.saturating_sub(sandbox.store.get_fuel().unwrap_or(fuel));
    let ran = result.as_ref().map(drop);
    observe::plugin_call_ran(&instances.name, &export.info.name, consumed, ran);
    let state = sandbox.store.data();
    state.log_output();
    let (plugin, func, elapsed) = (&*instances.name, &export.info.name, started.elapsed());
    match &result {
        Ok(_) => tracing::debug!(target: "callme::plugin", plugin, func, ?elapsed, "call"),
        Err(e) => {
            // The guest's own words (a `GuestError` of up to `result_bytes`,
            // a trap with its stderr): one line, of bounded length.
            let (error, _) = one_line(&e.to_string(), LOG_RECORD_BYTES);
            tracing::debug!(target: "callme::plugin", plugin, func, ?elapsed, %error, "call failed")
        }
    }
    result
}

/// Calls the function in `instance`, with results sized for its type.
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

/// Why a call or an instantiation in the store of `state` failed.
fn failure(error: wasmtime::Error, state: &CallState) -> PluginError {
    classify(error, state.limiter.refused, &state.stderr.text())
}

/// The results of a call that returned, as JSON of at most `cap` bytes.
fn results_json(export: &Export, results: &[Val], cap: usize) -> Result<Value, PluginError> {
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
                // The reply holds it twice: as the message and as the data.
                budget
                    .spend(json_string_bytes(&message))
                    .map_err(too_large)?;
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
