//! What answers a server id: a plugin (swapped atomically on redeploy) or native Rust functions.
//!
//! A [`Service`] runs one request: plugin calls on the server's plugin
//! executor, so CPU-heavy guests never starve the tasks that talk to the
//! broker (a call on a nearly idle host starts where it was taken and
//! moves there at its first wait or yield); native functions on tokio's
//! blocking pool, so they may block.
//! `_describe` is answered here too, from what the service holds.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Poll, Wake, Waker};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde_json::Value;
use tracing::{Instrument, Span};

use crate::plugin::{CallContext, Plugin};
use crate::protocol::{Args, DESCRIBE, DescribedFunction, Description, QueueType, Request};
use crate::{ErrorKind, Proxy, RemoteError, TraceContext};

type NativeFn = dyn Fn(Args) -> Result<Value, RemoteError> + Send + Sync;

/// Native Rust functions served under one server id (the seed's
/// `register_function`).
#[derive(Default, Clone)]
pub struct NativeFunctions {
    functions: HashMap<String, (String, Arc<NativeFn>)>,
}

impl NativeFunctions {
    /// An empty set.
    pub fn new() -> Self {
        NativeFunctions::default()
    }

    /// Registers `f` as `name`. `signature` is what `_describe` shows
    /// (e.g. `func(a: s64, b: s64) -> s64`). `f` runs on a blocking
    /// thread, so it may compute or block. Registering a name again
    /// replaces its function, as the seed's `register_function` did.
    ///
    /// # Panics
    ///
    /// If `name` is empty or starts with `_`: such names are the
    /// protocol's own (`_describe`), and a caller could never reach the
    /// function.
    pub fn register(
        &mut self,
        name: &str,
        signature: &str,
        f: impl Fn(Args) -> Result<Value, RemoteError> + Send + Sync + 'static,
    ) -> &mut Self {
        assert!(
            !name.is_empty() && !name.starts_with('_'),
            "a native function cannot be named `{name}`: names that are empty or start with `_` are reserved for the protocol"
        );
        self.functions
            .insert(name.to_string(), (signature.to_string(), Arc::new(f)));
        self
    }

    fn describe(&self) -> Vec<DescribedFunction> {
        let mut list: Vec<_> = self
            .functions
            .iter()
            .map(|(name, (signature, _))| DescribedFunction {
                name: name.clone(),
                signature: signature.clone(),
            })
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        list
    }
}

/// What answers a server id.
pub(super) enum Service {
    /// A plugin; a new version is swapped in whole.
    Plugin(ArcSwap<Plugin>),
    /// Native functions.
    Native(NativeFunctions),
}

impl Service {
    /// The queue type this service asks for, if it sets one.
    pub(super) fn queue_type(&self) -> Option<QueueType> {
        match self {
            Service::Plugin(slot) => slot.load().settings().queue_type,
            Service::Native(_) => None,
        }
    }
}

/// What a call needs from the server around it.
pub(super) struct Context<'a> {
    /// The server id called.
    pub(super) id: &'a str,
    /// Where plugin code runs.
    pub(super) executor: &'a tokio::runtime::Handle,
    /// Whether the host is nearly idle and the request small: it is one
    /// of at most [`QUIET_IN_FLIGHT`] taken and not yet settled, across
    /// the host's ids, and of at most [`QUIET_MAX_REQUEST_BYTES`].
    pub(super) quiet: bool,
    /// The server's concurrency, for plugins that do not set their own.
    pub(super) default_concurrency: usize,
    /// Hops the request is from its client (`x-callme-depth`).
    pub(super) depth: u32,
    /// When the call that made this one (a plugin's) stops waiting for
    /// it: see [`CallContext::ends_by`].
    pub(super) ends_by: Option<std::time::Instant>,
    /// The call's span, which calls its plugin makes continue.
    pub(super) trace: &'a TraceContext,
    /// The proxy plugins granted `rpc` call other servers through.
    pub(super) calls_out: Option<&'a Proxy>,
}

impl Service {
    /// Whether `func` names a function of this service, or `_describe`:
    /// only those are told apart in the metrics.
    pub(super) fn exports(&self, func: &str) -> bool {
        func == DESCRIBE
            || match self {
                Service::Plugin(slot) => slot.load().has_function(func),
                Service::Native(functions) => functions.functions.contains_key(func),
            }
    }

    /// Runs `request`.
    pub(super) async fn call(
        &self,
        request: Request,
        cx: &Context<'_>,
    ) -> Result<Value, RemoteError> {
        let Request { func, args } = request;
        match self {
            Service::Plugin(slot) => {
                // Load once: the whole call runs on this version even if a
                // new one is swapped in meanwhile.
                let plugin = slot.load_full();
                if func == DESCRIBE {
                    return Ok(described(describe_plugin(&plugin, cx)));
                }
                // The call's span follows it onto the plugin executor, so
                // the plugin's log lines carry its trace.
                let context = CallContext {
                    busy: !cx.quiet,
                    ends_by: cx.ends_by,
                    ..CallContext::new(cx.depth, Some(cx.trace.clone()), cx.calls_out.cloned())
                };
                let in_place = cx.quiet && plugin.has_ready_instance();
                let call =
                    async move { plugin.call_with(&func, &args, context).await }.in_current_span();
                match run_plugin_call(cx, in_place, call).await {
                    Ok(r) => r.map_err(RemoteError::from),
                    Err(failed) => Err(RemoteError::new(
                        ErrorKind::Internal,
                        format!("the call's task failed: {failed}"),
                    )),
                }
            }
            Service::Native(functions) => {
                if func == DESCRIBE {
                    return Ok(described(Description {
                        server: cx.id.to_string(),
                        version: "native".into(),
                        concurrency: None,
                        reuse_instances: None,
                        prewarm: None,
                        functions: functions.describe(),
                        capabilities: Vec::new(),
                    }));
                }
                functions.call(&func, args).await
            }
        }
    }
}

/// Requests in flight (taken, not yet acked) at which the host counts
/// as nearly idle: a caller calling in sequence has its request in flight
/// and, for a moment, the previous one, whose reply's confirm is still on
/// its way.
pub(super) const QUIET_IN_FLIGHT: usize = 2;

/// The largest request run in place on a quiet host. Binding a request's
/// arguments into the guest and its result back is done where the call is
/// polled, and grows with the request: about 4.5 ms for `types`'s
/// `echo-nested` with 78 KB of records, 1.5 ms with 64 KB of `null`s
/// (a release build). At 16 KiB that stays near [`IN_PLACE_BUDGET`],
/// while the hop it saves (about 25 µs) matters only to small calls.
pub(super) const QUIET_MAX_REQUEST_BYTES: usize = 16 << 10;

/// How long a call run in place may keep running here through its own
/// yields (a guest yields every [`crate::plugin::YIELD_EVERY_FUEL`] units
/// of fuel) before it moves to the executor: the first call of a fresh
/// JavaScript instance yields once or twice in its first few hundred
/// microseconds, and moving it then cost it the hop.
pub(super) const IN_PLACE_BUDGET: Duration = Duration::from_millis(1);

/// Runs a plugin call on the plugin executor, except when `in_place`:
/// then the call is first polled right here, and moves to the executor
/// at its first wait, or at a yield once it has run here for
/// [`IN_PLACE_BUDGET`]. The hop to the executor and back is
/// half of what a small call costs its caller (about 25 µs of 35–50),
/// and most calls finish without waiting. The server asks for it only
/// while the host is nearly idle (see [`Context::quiet`]), for a small
/// request, and when an instance is ready: nothing is made and nothing
/// dropped on this thread then, and the call holds this thread for about
/// [`IN_PLACE_BUDGET`] at most. Under load,
/// calls run on the executor from the start, where they do not hold up
/// the threads that talk to the broker.
///
/// Polled here, the call runs in the executor's runtime context, so the
/// timers and tasks it makes belong to the executor as they do when it
/// moves there; a panic in it is an error, as in a task of the executor.
async fn run_plugin_call<F>(cx: &Context<'_>, in_place: bool, call: F) -> Result<F::Output, String>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let mut call = Box::pin(call);
    if in_place {
        let started = Instant::now();
        let first = std::future::poll_fn(|task| {
            let _executor = cx.executor.enter();
            Poll::Ready(std::panic::catch_unwind(AssertUnwindSafe(|| {
                loop {
                    // Polled with a waker that says whether the call woke
                    // itself while polled: it yielded, and has more to
                    // run now, rather than waiting for something.
                    let woken = Arc::new(Woken {
                        yielded: AtomicBool::new(false),
                        task: task.waker().clone(),
                    });
                    let waker = Waker::from(Arc::clone(&woken));
                    let polled = call
                        .as_mut()
                        .poll(&mut std::task::Context::from_waker(&waker));
                    // Not when the wake was tokio's own, for this task's
                    // spent budget: polling again would only spin.
                    if polled.is_pending()
                        && woken.yielded.load(Ordering::SeqCst)
                        && tokio::task::coop::has_budget_remaining()
                        && started.elapsed() < IN_PLACE_BUDGET
                    {
                        continue;
                    }
                    return polled;
                }
            })))
        })
        .await;
        match first {
            Ok(Poll::Ready(out)) => return Ok(out),
            Ok(Poll::Pending) => {}
            Err(panic) => return Err(panic_message(panic.as_ref())),
        }
    }
    cx.executor.spawn(call).await.map_err(|e| e.to_string())
}

/// A call's waker while it runs in place: notes a wake, and passes it on
/// to the task running the call.
struct Woken {
    yielded: AtomicBool,
    task: Waker,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.yielded.store(true, Ordering::SeqCst);
        self.task.wake_by_ref();
    }
}

/// What a caught panic says.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    let text = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message");
    format!("panicked: {text}")
}

fn describe_plugin(plugin: &Plugin, cx: &Context<'_>) -> Description {
    let settings = plugin.settings();
    Description {
        server: cx.id.to_string(),
        version: plugin.hash().to_string(),
        concurrency: Some(settings.concurrency.unwrap_or(cx.default_concurrency)),
        reuse_instances: Some(settings.reuse_instances),
        prewarm: Some(settings.prewarm),
        functions: plugin
            .functions()
            .iter()
            .map(|f| DescribedFunction {
                name: f.name.clone(),
                signature: f.signature.clone(),
            })
            .collect(),
        capabilities: plugin
            .capabilities()
            .iter()
            .map(|c| c.to_string())
            .collect(),
    }
}

fn described(description: Description) -> Value {
    // A struct of strings, numbers and lists always serialises.
    serde_json::to_value(description).unwrap_or(Value::Null)
}

impl NativeFunctions {
    async fn call(&self, func: &str, args: Args) -> Result<Value, RemoteError> {
        let Some((_, f)) = self.functions.get(func) else {
            let mut names: Vec<_> = self.functions.keys().cloned().collect();
            names.sort();
            return Err(RemoteError::new(
                ErrorKind::NoSuchFunction,
                format!(
                    "no function `{}` (available: {})",
                    crate::protocol::shown_id(func),
                    names.join(", ")
                ),
            ));
        };
        let f = f.clone();
        // The function's own log lines carry the call's trace.
        let span = Span::current();
        match tokio::task::spawn_blocking(move || span.in_scope(|| f(args))).await {
            Ok(r) => r,
            Err(e) => Err(RemoteError::new(
                ErrorKind::Internal,
                format!("the function panicked: {e}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "reserved for the protocol")]
    fn a_native_function_cannot_take_the_protocols_own_name() {
        NativeFunctions::new().register(DESCRIBE, "func()", |_| Ok(Value::Null));
    }

    #[test]
    fn a_name_registered_again_is_replaced() {
        let mut natives = NativeFunctions::new();
        natives
            .register("add", "func(a: s64) -> s64", |_| Ok(Value::Null))
            .register("add", "func(a: s64, b: s64) -> s64", |_| Ok(Value::Null));
        let described = natives.describe();
        assert_eq!(described.len(), 1);
        assert_eq!(described[0].signature, "func(a: s64, b: s64) -> s64");
    }
}
