//! Capabilities a plugin may be granted, each off until its sidecar grants it: its own settings (`config`), calls to other servers (`rpc`) and outbound HTTP (`http`).
//!
//! `config` and `rpc` are the imports of `callme:plugin@0.2.0`
//! (`wit/v0.2/callme.wit`) beside its `host.log`. A plugin built against
//! 0.1.0 gets none of them and loads as before: the linker offers both
//! versions. `http` is the standard `wasi:http/outgoing-handler` of WASI
//! 0.2, not part of the callme contract, so any plugin may import it. A
//! plugin that imports a capability its sidecar does not grant still
//! loads; the import answers as if nothing were granted (`config.get`
//! gives none, `rpc.call` a `NotGranted` error, an HTTP request
//! `HttpRequestDenied`), so granting is a sidecar change, applied on hot
//! deploy like any other setting.
//!
//! [`Capabilities`] are what a sidecar grants; a [`CallContext`] is what
//! one call brings from the request it serves (its depth in a chain of
//! calls, its trace, the host's proxy). Both reach the guest through the
//! store's [`CallCaps`].
//!
//! - `config`: the `[config]` table, secrets from the environment;
//! - `rpc`: calls to other callme servers, their grant and depth limit;
//! - `http`: the hosts a plugin may send HTTP requests to, the size and
//!   time limits of each.

pub(crate) mod config;
pub(crate) mod http;
pub(crate) mod rpc;

use std::time::Instant;

use wasmtime::component::{HasSelf, Linker};

pub use config::{Config, ConfigError, ConfigValue};
pub use http::{
    DEFAULT_HTTP_MAX_REQUESTS, DEFAULT_HTTP_MAX_RESPONSE_BYTES, DEFAULT_HTTP_TIMEOUT, HttpGrant,
    InvalidHost,
};
pub use rpc::{DEFAULT_MAX_CALL_DEPTH, DEFAULT_MAX_CALLS, InvalidGrant, RpcGrant};

use super::sandbox::{CallState, host_bindings};
use crate::{PluginError, Proxy, TraceContext};

/// Host bindings of `wit/v0.2/callme.wit`.
pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit/v0.2",
        world: "callme:plugin/plugin@0.2.0",
        imports: {
            // Waits for the broker: the guest is suspended, not spinning.
            "callme:plugin/rpc.call": async,
        },
    });
}

use bindings::callme::plugin::{config as config_wit, host as host_wit, rpc as rpc_wit};

/// What a plugin's sidecar grants it. Nothing, by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Its own settings, for `config.get`.
    pub config: Config,
    /// The servers it may call with `rpc.call`.
    pub rpc: RpcGrant,
    /// The hosts it may send HTTP requests to, and their limits.
    pub http: HttpGrant,
}

/// What one call of a plugin brings from the request it serves.
#[derive(Clone, Default)]
#[non_exhaustive]
pub struct CallContext {
    /// Hops from the client that started the chain of calls: 0 for a
    /// call from a client, one more for each server that called on.
    pub depth: u32,
    /// The span of the call, which calls the guest makes continue.
    pub trace: Option<TraceContext>,
    /// The proxy the guest's calls go through; without one (a plugin run
    /// outside a server) they fail with `Unavailable`.
    pub proxy: Option<Proxy>,
    /// The host is busy (more requests in flight than a caller calling in
    /// sequence makes): the work no call waits for, making spares and
    /// dropping used instances, is done with the calls rather than on the
    /// lowest-priority thread given to `Plugin::start_prewarm`, which
    /// gets too little CPU under load to keep up.
    pub busy: bool,
    /// When the calling call ends, for a call another server's plugin
    /// made: this one ends then too, if its own deadline is later. Its
    /// caller has stopped waiting for it by then.
    pub ends_by: Option<Instant>,
}

impl CallContext {
    /// A call `depth` hops from its client, in the span `trace`, whose
    /// guest calls other servers through `proxy`.
    pub fn new(depth: u32, trace: Option<TraceContext>, proxy: Option<Proxy>) -> CallContext {
        CallContext {
            depth,
            trace,
            proxy,
            busy: false,
            ends_by: None,
        }
    }
}

/// The capabilities part of a store: what is granted, and the call being
/// served.
#[derive(Default)]
pub(crate) struct CallCaps {
    granted: Capabilities,
    context: CallContext,
    /// When the call being served must end.
    deadline: Option<Instant>,
    /// Calls to other servers the call being served has sent.
    rpc_sent: u32,
    /// `wasi:http`'s state, checking requests against `granted.http`.
    http: http::HttpState,
}

impl CallCaps {
    /// Starts serving a call that must end by `deadline`.
    pub(crate) fn begin(
        &mut self,
        granted: &Capabilities,
        context: CallContext,
        deadline: Instant,
    ) {
        self.granted = granted.clone();
        self.context = context;
        self.deadline = Some(deadline);
        self.rpc_sent = 0;
        self.http.begin(&granted.http);
    }

    /// Forgets the call, so an instance kept for later holds no proxy.
    pub(crate) fn end(&mut self) {
        *self = CallCaps {
            http: self.http.ended(),
            ..CallCaps::default()
        };
    }

    /// Whether what the instance was given through its capabilities
    /// rules out keeping it for another call (see `http::heads`).
    pub(crate) fn is_spent(&self) -> bool {
        self.http.is_spent()
    }
}

/// Offers the 0.2 interfaces (host, config, rpc) and `wasi:http` to
/// guests.
///
/// `wasi:http` is offered to every plugin: a component that does not
/// import it pays nothing for it (its instances link only what it
/// imports), and one that does gets its requests refused unless granted.
///
/// # Errors
///
/// [`PluginError::Internal`] when an interface cannot be added.
pub(crate) fn add_to_linker(linker: &mut Linker<CallState>) -> Result<(), PluginError> {
    let failed = |e: wasmtime::Error| {
        PluginError::internal(format!("linking the 0.2 host interfaces: {e:#}"))
    };
    host_wit::add_to_linker::<CallState, HasSelf<CallState>>(linker, |s| s).map_err(failed)?;
    config_wit::add_to_linker::<CallState, HasSelf<CallState>>(linker, |s| s).map_err(failed)?;
    rpc_wit::add_to_linker::<CallState, HasSelf<CallState>>(linker, |s| s).map_err(failed)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(linker)
        .and_then(|()| http::parts::add_to_linker(linker))
        .map_err(|e| PluginError::internal(format!("linking wasi:http: {e:#}")))?;
    Ok(())
}

/// The capability an import of a component asks for, if it is one:
/// `config`, `rpc`, or `http` (`wasi:http/outgoing-handler`).
pub(crate) fn capability_of(import: &str) -> Option<&'static str> {
    let (path, version) = import.split_once('@')?;
    if !version.starts_with("0.2.") {
        return None;
    }
    match path {
        "callme:plugin/config" => Some("config"),
        "callme:plugin/rpc" => Some("rpc"),
        "wasi:http/outgoing-handler" => Some("http"),
        _ => None,
    }
}

/// Whether `import` is one of the 0.2 callme interfaces.
pub(crate) fn is_callme_v2(import: &str) -> bool {
    let (path, version) = import.split_once('@').unwrap_or((import, ""));
    version.starts_with("0.2.")
        && matches!(
            path,
            "callme:plugin/host" | "callme:plugin/config" | "callme:plugin/rpc"
        )
}

impl host_wit::Host for CallState {
    fn log(&mut self, level: host_wit::Level, message: String) {
        use host_bindings::callme::plugin::host::{Host as HostV1, Level};
        let level = match level {
            host_wit::Level::Trace => Level::Trace,
            host_wit::Level::Debug => Level::Debug,
            host_wit::Level::Info => Level::Info,
            host_wit::Level::Warn => Level::Warn,
            host_wit::Level::Error => Level::Error,
        };
        HostV1::log(self, level, message);
    }
}

impl config_wit::Host for CallState {
    fn get(&mut self, key: String) -> Option<String> {
        let value = self.caps.granted.config.get(&key)?;
        Some(value.value().to_string())
    }
}

impl rpc_wit::Host for CallState {
    async fn call(
        &mut self,
        server: String,
        func: String,
        args: String,
    ) -> Result<String, rpc_wit::RemoteError> {
        // Owned, so the wait holds nothing of the store's data.
        let plugin = self.plugin.clone();
        let grant = self.caps.granted.rpc.clone();
        let context = self.caps.context.clone();
        let deadline = self.caps.deadline;
        let sent = &mut self.caps.rpc_sent;
        rpc::call(
            &plugin, &grant, &context, deadline, sent, &server, &func, &args,
        )
        .await
        .map_err(|f| rpc_wit::RemoteError {
            type_: f.kind.to_string(),
            message: f.message,
            data: f.data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_named_by_their_0_2_imports() {
        assert_eq!(capability_of("callme:plugin/config@0.2.0"), Some("config"));
        assert_eq!(capability_of("callme:plugin/rpc@0.2.3"), Some("rpc"));
        assert_eq!(capability_of("callme:plugin/host@0.2.0"), None);
        assert_eq!(capability_of("callme:plugin/rpc@0.1.0"), None);
        assert_eq!(
            capability_of("wasi:http/outgoing-handler@0.2.4"),
            Some("http")
        );
        assert_eq!(capability_of("wasi:http/types@0.2.4"), None);
        assert!(!is_callme_v2("wasi:http/outgoing-handler@0.2.4"));
        assert!(is_callme_v2("callme:plugin/host@0.2.0"));
        assert!(!is_callme_v2("callme:plugin/other@0.2.0"));
        assert!(!is_callme_v2("callme:plugin/rpc@0.3.0"));
    }
}
