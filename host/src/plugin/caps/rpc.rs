//! The `rpc` capability: a guest calls a function of another callme server through the host's broker connection.
//!
//! Granted per server id by the sidecar (`rpc = ["calc", "billing"]`,
//! `"*"` for any). Before anything is published the host checks, in this
//! order, that the id is granted, that the call is not one hop too deep
//! (every request carries its depth in the `x-callme-depth` header, one
//! more per hop, so servers calling each other in a cycle stop at
//! `rpc_max_depth`), that the calling call has not already sent its
//! `rpc_max_calls` calls, that the arguments are a JSON array or object,
//! and that the calling call has time left. The sub-call waits at most what
//! is left of the calling call's deadline; the guest spends no fuel while
//! it waits, and its deadline keeps running.

use std::collections::BTreeSet;
use std::time::Instant;

use serde_json::Value;

use super::CallContext;
use crate::protocol::{Args, DEFAULT_MAX_REQUEST_BYTES, is_valid_server_id, shown_id};
use crate::proxy::CallOptions;
use crate::{Error, ErrorKind};

/// Hops a chain of calls may take by default: the first server called by
/// a client is at depth 0, a server it calls at depth 1. Deep enough for
/// any sensible composition, shallow enough that a cycle ends fast.
pub const DEFAULT_MAX_CALL_DEPTH: u32 = 8;

/// Most hops a sidecar may allow: every hop holds a call, an instance and
/// a pool slot while it waits.
pub(crate) const MAX_CALL_DEPTH: u32 = 64;

/// Calls to other servers one call of a plugin may send by default:
/// enough for any sensible fan-out, few enough that a plugin looping on
/// calls cannot flood the servers it may call for its whole deadline.
pub const DEFAULT_MAX_CALLS: u32 = 256;

/// Most calls a sidecar may allow one call to send.
pub(crate) const MAX_CALLS: u32 = 100_000;

/// The servers a plugin may call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcGrant {
    /// Server ids granted; `*` grants any.
    servers: BTreeSet<String>,
    /// Deepest hop its calls may be (see [`DEFAULT_MAX_CALL_DEPTH`]).
    pub max_depth: u32,
    /// Most calls one call of the plugin may send (256 by default).
    pub max_calls: u32,
}

impl Default for RpcGrant {
    fn default() -> Self {
        RpcGrant {
            servers: BTreeSet::new(),
            max_depth: DEFAULT_MAX_CALL_DEPTH,
            max_calls: DEFAULT_MAX_CALLS,
        }
    }
}

/// A grant naming something that cannot be a server id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`rpc` entry `{}` is not a server id (letters, digits, `-`, `_`, `.`) nor `*`", .0.escape_debug())]
pub struct InvalidGrant(pub String);

impl RpcGrant {
    /// A grant of calls to `servers` (`*`: any).
    ///
    /// # Errors
    ///
    /// [`InvalidGrant`] for an entry that is neither a server id nor `*`.
    pub fn new<S: Into<String>>(
        servers: impl IntoIterator<Item = S>,
        max_depth: u32,
    ) -> Result<RpcGrant, InvalidGrant> {
        let servers = servers
            .into_iter()
            .map(Into::into)
            .map(|s| {
                if s == "*" || is_valid_server_id(&s) {
                    Ok(s)
                } else {
                    Err(InvalidGrant(s))
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(RpcGrant {
            servers,
            max_depth,
            max_calls: DEFAULT_MAX_CALLS,
        })
    }

    /// The same grant, letting one call of the plugin send `max_calls`
    /// calls.
    #[must_use]
    pub fn with_max_calls(self, max_calls: u32) -> RpcGrant {
        RpcGrant { max_calls, ..self }
    }

    /// Whether any server is granted.
    pub fn is_granted(&self) -> bool {
        !self.servers.is_empty()
    }

    /// Whether calls to `server` are granted.
    pub fn allows(&self, server: &str) -> bool {
        self.servers.contains("*") || self.servers.contains(server)
    }

    /// How metrics name a call to `server`: its id when granted by name,
    /// `*` when granted only by `*`, `_not_granted` otherwise. Bounded by
    /// the sidecar, whatever ids the guest names.
    pub(crate) fn metric_target<'a>(&self, server: &'a str) -> &'a str {
        if self.servers.contains(server) {
            server
        } else if self.servers.contains("*") {
            "*"
        } else {
            "_not_granted"
        }
    }

    /// The ids granted, sorted (`*` included as written).
    pub fn servers(&self) -> impl Iterator<Item = &str> {
        self.servers.iter().map(String::as_str)
    }
}

/// Why a guest's call failed, as the guest sees it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CallFailure {
    pub(crate) kind: &'static str,
    pub(crate) message: String,
    pub(crate) data: Option<String>,
}

impl CallFailure {
    fn new(kind: &'static str, message: String) -> CallFailure {
        CallFailure {
            kind,
            message,
            data: None,
        }
    }

    fn from_error(e: Error) -> CallFailure {
        match e {
            Error::Remote(remote) => CallFailure {
                kind: remote.kind.as_str(),
                message: remote.message,
                data: (!remote.data.is_null()).then(|| remote.data.to_string()),
            },
            // The broker's words name the host's user and vhost: the
            // guest is told only that access was refused.
            Error::AccessRefused(_) => CallFailure::new(
                e.type_name(),
                "the broker refused this host access to that server".to_string(),
            ),
            other => CallFailure::new(other.type_name(), other.to_string()),
        }
    }
}

/// The longest function name a guest may call.
const MAX_FUNC_BYTES: usize = 1024;

/// Makes one call for the guest of `plugin`: checks, then sends through
/// the context's proxy; the result as JSON text. `sent` counts the calls
/// the calling call has sent, this one included once it is sent. Every
/// call is counted in the metrics, refused or sent.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn call(
    plugin: &str,
    grant: &RpcGrant,
    cx: &CallContext,
    deadline: Option<Instant>,
    sent: &mut u32,
    server: &str,
    func: &str,
    args: &str,
) -> Result<String, CallFailure> {
    let before = *sent;
    let mut counted = Counted {
        plugin,
        target: grant.metric_target(server),
        started: Instant::now(),
        outcome: None,
    };
    let result = async {
        if !grant.allows(server) {
            return Err(CallFailure::new(
                "NotGranted",
                format!(
                    "calls to server `{}` are not granted to this plugin (its sidecar's `rpc` list)",
                    shown_id(server)
                ),
            ));
        }
        let depth = cx.depth.saturating_add(1);
        if depth > grant.max_depth {
            return Err(CallFailure::new(
                "CallDepthExceeded",
                format!(
                    "call depth limit of {} reached: this call is already {} hops from its client \
                     (servers calling each other in a cycle?)",
                    grant.max_depth, cx.depth
                ),
            ));
        }
        if *sent >= grant.max_calls {
            return Err(CallFailure::new(
                "TooManyCalls",
                format!(
                    "this call has sent {} calls to other servers, the most it may \
                     (the sidecar's `rpc_max_calls`)",
                    grant.max_calls
                ),
            ));
        }
        // The name is the guest's too, and goes into the request and the
        // host's log: no export has a name anywhere near this long.
        if func.len() > MAX_FUNC_BYTES {
            return Err(CallFailure::new(
                ErrorKind::BadRequest.as_str(),
                format!(
                    "the function name is {} bytes; a call's may be at most {MAX_FUNC_BYTES}",
                    func.len()
                ),
            ));
        }
        // The text is the guest's, as large as its memory: refused before
        // it is parsed, at the size and the count of objects and arrays
        // every server refuses by default anyway (an object takes about
        // 700 bytes once parsed).
        if args.len() > DEFAULT_MAX_REQUEST_BYTES {
            return Err(CallFailure::new(
                ErrorKind::InvalidArguments.as_str(),
                format!(
                    "the arguments are {} bytes of JSON; a call's may be at most {} \
                     (servers refuse larger requests)",
                    args.len(),
                    DEFAULT_MAX_REQUEST_BYTES
                ),
            ));
        }
        if let Some(refusal) = crate::protocol::too_many_containers(args, DEFAULT_MAX_REQUEST_BYTES) {
            return Err(CallFailure::new(
                ErrorKind::InvalidArguments.as_str(),
                format!("the arguments' text {refusal}"),
            ));
        }
        // Read as a server reads a request: a key given twice is refused.
        let args = match crate::protocol::parse_json(args) {
            Ok(Value::Array(a)) => Args::positional(a),
            Ok(Value::Object(o)) => Args::keywords(o),
            Ok(_) => {
                return Err(CallFailure::new(
                    ErrorKind::InvalidArguments.as_str(),
                    "the arguments must be a JSON array (positional) or object (keywords)".into(),
                ));
            }
            Err(e) => {
                return Err(CallFailure::new(
                    ErrorKind::InvalidArguments.as_str(),
                    format!("the arguments are not JSON: {e}"),
                ));
            }
        };
        let Some(proxy) = &cx.proxy else {
            return Err(CallFailure::new(
                "Unavailable",
                "no broker connection: calls to other servers work only in a served plugin".into(),
            ));
        };
        let remaining = deadline.map_or(crate::plugin::DEFAULT_DEADLINE, |d| {
            d.saturating_duration_since(Instant::now())
        });
        if remaining.is_zero() {
            return Err(CallFailure::new(
                ErrorKind::Timeout.as_str(),
                "the calling call's deadline has passed".into(),
            ));
        }
        let mut options = CallOptions::new(remaining).with_depth(depth);
        if let Some(trace) = &cx.trace {
            options = options.with_trace(trace.clone());
        }
        *sent += 1;
        let started = Instant::now();
        let outcome = proxy.call_with(server, func, args, options).await;
        let elapsed = started.elapsed();
        match outcome {
            Ok(value) => {
                tracing::debug!(target: "callme::plugin", plugin, server, func, depth, ?elapsed, "rpc call");
                Ok(value.to_string())
            }
            Err(e) => {
                let failure = CallFailure::from_error(e);
                let server = shown_id(server);
                tracing::debug!(target: "callme::plugin", plugin, %server, func, depth, ?elapsed, error = %failure.kind, "rpc call failed");
                Err(failure)
            }
        }
    }
    .await;
    counted.outcome = Some((
        result.as_ref().map(drop).map_err(|f| f.kind),
        *sent > before,
    ));
    result
}

/// A call of a guest, counted in the metrics when it ends: with its
/// outcome (timed if it was sent), or as `cancelled` when the guest's
/// call is dropped first (its deadline passed, or the host stops).
struct Counted<'a> {
    plugin: &'a str,
    target: &'a str,
    started: Instant,
    /// The outcome, and whether the call was sent.
    outcome: Option<(Result<(), &'static str>, bool)>,
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let (outcome, sent) = self.outcome.unwrap_or((Err("cancelled"), true));
        let timed = sent.then(|| self.started.elapsed());
        crate::observe::plugin_rpc_call(self.plugin, self.target, outcome, timed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_tells_the_guest_nothing_of_the_hosts_user() {
        let refused = Error::AccessRefused(
            "ACCESS_REFUSED - write access to exchange 'x' in vhost 'prod' refused for user 'callme-host'".into(),
        );
        let failure = CallFailure::from_error(refused);
        assert_eq!(failure.kind, "AccessRefused");
        assert!(
            !failure.message.contains("callme-host"),
            "{}",
            failure.message
        );
        assert!(!failure.message.contains("prod"), "{}", failure.message);
    }

    #[test]
    fn grants_name_servers_or_everything() {
        let grant = RpcGrant::new(["calc", "billing"], 8).unwrap();
        assert!(grant.allows("calc") && grant.allows("billing"));
        assert!(!grant.allows("other"));
        let any = RpcGrant::new(["*"], 8).unwrap();
        assert!(any.allows("anything"));
        assert_eq!(grant.metric_target("calc"), "calc");
        assert_eq!(grant.metric_target("other"), "_not_granted");
        let both = RpcGrant::new(["calc", "*"], 8).unwrap();
        assert_eq!(both.metric_target("calc"), "calc");
        assert_eq!(both.metric_target("any-other"), "*");
        assert!(!RpcGrant::default().is_granted());
        assert!(!RpcGrant::default().allows("calc"));
        assert_eq!(
            RpcGrant::new(["ca lc"], 8).unwrap_err().to_string(),
            "`rpc` entry `ca lc` is not a server id (letters, digits, `-`, `_`, `.`) nor `*`"
        );
    }

    fn run(grant: &RpcGrant, cx: &CallContext, server: &str, args: &str) -> CallFailure {
        run_func(grant, cx, server, "add", args)
    }

    fn run_func(
        grant: &RpcGrant,
        cx: &CallContext,
        server: &str,
        func: &str,
        args: &str,
    ) -> CallFailure {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let mut sent = 0;
        rt.block_on(call("p", grant, cx, None, &mut sent, server, func, args))
            .unwrap_err()
    }

    #[test]
    fn refusals_come_before_anything_is_sent() {
        let grant = RpcGrant::new(["calc"], 2).unwrap();
        let cx = CallContext::default();
        assert_eq!(run(&grant, &cx, "other", "[1, 2]").kind, "NotGranted");
        // The guest's id is not copied whole, nor escaped whole, into the
        // message (six bytes for each of these).
        let long = run(&grant, &cx, &"\u{7f}".repeat(1 << 20), "[1, 2]");
        assert_eq!(long.kind, "NotGranted");
        assert!(long.message.len() < 2000, "{} bytes", long.message.len());
        let deep = CallContext {
            depth: 2,
            ..CallContext::default()
        };
        let failure = run(&grant, &deep, "calc", "[1, 2]");
        assert_eq!(failure.kind, "CallDepthExceeded");
        assert!(
            failure.message.contains("limit of 2"),
            "{}",
            failure.message
        );
        let none = grant.clone().with_max_calls(0);
        let failure = run(&none, &cx, "calc", "[1, 2]");
        assert_eq!(failure.kind, "TooManyCalls");
        assert!(
            failure.message.contains("rpc_max_calls"),
            "{}",
            failure.message
        );
        assert_eq!(run(&grant, &cx, "calc", "1").kind, "InvalidArguments");
        assert_eq!(run(&grant, &cx, "calc", "[1,").kind, "InvalidArguments");
        // More arrays than a request of the size every server takes may
        // hold (2.4 MB of `[0]`, about 100 MB parsed): refused unparsed.
        let arrays = format!("[{}]", vec!["[0]"; 600_000].join(","));
        let failure = run(&grant, &cx, "calc", &arrays);
        assert_eq!(failure.kind, "InvalidArguments");
        assert!(
            failure.message.contains("600001 arrays"),
            "{}",
            failure.message
        );
        let long = "f".repeat(MAX_FUNC_BYTES + 1);
        let failure = run_func(&grant, &cx, "calc", &long, "[1, 2]");
        assert_eq!(failure.kind, "BadRequest", "{}", failure.message);
        assert!(
            failure.message.contains("at most 1024"),
            "{}",
            failure.message
        );
        // Without a proxy (a plugin run outside a server).
        assert_eq!(run(&grant, &cx, "calc", "[1, 2]").kind, "Unavailable");
        let longest = "f".repeat(MAX_FUNC_BYTES);
        assert_eq!(
            run_func(&grant, &cx, "calc", &longest, "[1, 2]").kind,
            "Unavailable"
        );
    }
}
