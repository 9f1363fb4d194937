//! callme: RPC over AMQP, serving sandboxed WebAssembly plugins and native functions.
//!
//! A server consumes requests for a server id from RabbitMQ and answers
//! them by calling a function: an export of a WebAssembly component (a
//! plugin, run in a fresh sandbox per call) or a native Rust function. A
//! [`Proxy`] calls them by server id and function name with JSON arguments.
//! The exchange and queue names follow the seed's design, so the broker's
//! own permission system decides who may call which server.
//!
//! # Layout
//!
//! - `protocol`: wire format and names of exchanges and queues.
//! - `error`: [`PluginError`] (runtime) and [`Error`] (proxy and server).
//! - `amqp/`: the broker below the RPC: connecting (with TLS), a link that
//!   replaces a lost connection, declarations, publishing with confirms,
//!   and the consume loop that outlives connections.
//! - `proxy/`: the client: calls, pending replies, the reply consumer, a
//!   blocking facade.
//! - `server/`: served ids and their consumers, one job per delivery from
//!   decode to ack, replies (feature `server`).
//! - `plugin/`: the plugin runtime: loading, calls and their limits, settings (feature `server`).
//! - `json`: JSON read strictly, each object naming a key once (requests).
//! - `trace`: W3C trace context, the `traceparent` a call carries.
//! - `watcher`: the plugins directory: load, follow, swap (feature `server`).
//! - `serve`: the `callme serve` loop: signals, graceful shutdown.
//! - `scaffold`: `callme new`, plugin projects from the templates in `templates/` (feature `cli`).
//! - `observe`: metrics, health and readiness, and their HTTP endpoint (feature `server`);
//!   a proxy's call metrics (feature `metrics`).

mod amqp;
mod error;
mod json;
#[cfg(feature = "metrics")]
pub mod observe;
#[cfg(feature = "server")]
pub mod plugin;
pub mod protocol;
mod proxy;
#[cfg(feature = "cli")]
pub mod scaffold;
#[cfg(feature = "server")]
pub mod serve;
#[cfg(feature = "server")]
mod server;
mod trace;
#[cfg(feature = "server")]
mod watcher;

pub use amqp::{
    ConnectOptions, DEFAULT_AMQP_URL, MIN_THREAD_STACK, redact_uri, thread_stack_to_set,
};
pub use error::{Error, PluginError, TimeoutCause};
#[cfg(feature = "server")]
pub use plugin::{
    FunctionInfo, GuestLogLevel, Limits, Plugin, PluginSettings, Runtime, RuntimeConfig,
    RuntimeStats,
};
pub use protocol::{Args, ErrorKind, QueueType, RemoteError};
pub use proxy::{
    BlockingProxy, CallOptions, DEFAULT_MAX_PROXY_REQUEST_BYTES, DEFAULT_MAX_REPLY_BYTES,
    DEFAULT_TIMEOUT, Proxy, ServerProxy, args_from,
};
#[cfg(feature = "server")]
pub use server::{
    DEFAULT_DELIVERY_LIMIT, DEFAULT_QUEUE_EXPIRES, DEFAULT_REPLY_CONFIRM_LIMIT,
    MAX_REPLY_CONFIRM_LIMIT, NativeFunctions, SHUTDOWN_TIDY_LIMIT, Server, ServerOptions,
};
pub use trace::{SpanId, TraceContext, TraceId};
