//! Errors: [`PluginError`] for the plugin runtime, [`Error`] for the proxy and server.
//!
//! A plugin call fails in one of a few ways a caller can match on; each
//! maps to one [`ErrorKind`] on the wire, so a remote caller sees the same
//! distinction as a local one.

use serde_json::Value;

use crate::protocol::{ErrorKind, RemoteError};

/// Which limit stopped a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutCause {
    /// The call spent its fuel (CPU work).
    Fuel,
    /// The call ran past its wall-clock deadline.
    Deadline,
}

/// Why loading or calling a plugin failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// There is no function of that name.
    #[error("no function `{name}` (available: {})", available.join(", "))]
    NoSuchFunction {
        /// The name asked for.
        name: String,
        /// The names there are.
        available: Vec<String>,
    },
    /// Wrong arity, unknown keyword, wrong type or out-of-range value; the
    /// message names the parameter and the expected type.
    #[error("invalid arguments: {message}")]
    InvalidArguments {
        /// What is wrong.
        message: String,
    },
    /// The call ran out of fuel or past its deadline.
    #[error("{message}")]
    Timeout {
        /// Which limit.
        cause: TimeoutCause,
        /// Details.
        message: String,
    },
    /// The call hit its memory cap, or its result its size cap.
    #[error("memory limit: {message}")]
    MemoryLimit {
        /// Details.
        message: String,
    },
    /// The guest trapped: a panic (its message included), an abort, a
    /// stack overflow.
    #[error("trap: {message}")]
    Trap {
        /// The trap and what the guest wrote to stderr before it.
        message: String,
    },
    /// The function returned `result::err`.
    #[error("{message}")]
    GuestError {
        /// The payload as text.
        message: String,
        /// The payload as JSON.
        payload: Value,
    },
    /// The component was refused at load time.
    #[error("invalid plugin: {message}")]
    InvalidPlugin {
        /// Why.
        message: String,
    },
    /// The host failed for a reason of its own (its engine could not be
    /// made, ...).
    #[error("internal error: {message}")]
    Internal {
        /// Why.
        message: String,
    },
}

impl PluginError {
    #[cfg(feature = "server")]
    pub(crate) fn invalid_plugin(message: String) -> Self {
        PluginError::InvalidPlugin { message }
    }

    #[cfg(feature = "server")]
    pub(crate) fn internal(message: String) -> Self {
        PluginError::Internal { message }
    }

    /// The variant's name: the wire kind, or `InvalidPlugin` for a load error.
    pub fn type_name(&self) -> &'static str {
        match self {
            PluginError::InvalidPlugin { .. } => "InvalidPlugin",
            other => other.kind().as_str(),
        }
    }

    /// The wire kind of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PluginError::NoSuchFunction { .. } => ErrorKind::NoSuchFunction,
            PluginError::InvalidArguments { .. } => ErrorKind::InvalidArguments,
            PluginError::Timeout { .. } => ErrorKind::Timeout,
            PluginError::MemoryLimit { .. } => ErrorKind::MemoryLimit,
            PluginError::Trap { .. } => ErrorKind::Trap,
            PluginError::GuestError { .. } => ErrorKind::GuestError,
            PluginError::InvalidPlugin { .. } | PluginError::Internal { .. } => ErrorKind::Internal,
        }
    }
}

impl From<PluginError> for RemoteError {
    fn from(e: PluginError) -> Self {
        let kind = e.kind();
        let data = match &e {
            PluginError::GuestError { payload, .. } => payload.clone(),
            PluginError::Timeout { cause, .. } => Value::String(
                match cause {
                    TimeoutCause::Fuel => "fuel",
                    TimeoutCause::Deadline => "deadline",
                }
                .into(),
            ),
            _ => Value::Null,
        };
        let message = match &e {
            PluginError::InvalidArguments { message }
            | PluginError::MemoryLimit { message }
            | PluginError::Trap { message }
            | PluginError::GuestError { message, .. }
            | PluginError::Timeout { message, .. } => message.clone(),
            other => other.to_string(),
        };
        RemoteError {
            kind,
            message,
            data,
        }
    }
}

/// Why a proxy or server operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No reply within the call's timeout.
    #[error("no reply from `{server}` within {timeout:?}")]
    Timeout {
        /// The server id called.
        server: String,
        /// The timeout that passed.
        timeout: std::time::Duration,
    },
    /// No server with that id is bound: nobody would ever answer.
    #[error("no server `{0}` is running")]
    NoSuchServer(String),
    /// The broker's permission system refused.
    #[error("access refused by the broker: {0}")]
    AccessRefused(String),
    /// The server answered with an error.
    #[error("remote {}: {}", .0.kind, .0.message)]
    Remote(RemoteError),
    /// The connection to the broker failed or was lost.
    #[error("the broker connection failed")]
    Connection(#[source] lapin::Error),
    /// The AMQP handshake did not complete in time: something that is not
    /// a broker holds the port and says nothing, the broker is stuck, or
    /// the address does not answer at all.
    #[error("the broker at {broker} did not complete the AMQP handshake within {timeout:?}")]
    ConnectTimeout {
        /// The broker URI, password hidden.
        broker: String,
        /// The time the handshake was given.
        timeout: std::time::Duration,
    },
    /// The peer at the broker's address answered with something that is
    /// not AMQP (an HTTP server, a TLS port reached with `amqp://`).
    #[error(
        "{broker} is not an AMQP broker: it answered the handshake with something else{}",
        if broker.starts_with("amqp:") { " (a TLS port needs amqps://)" } else { "" }
    )]
    NotAmqp {
        /// The broker URI, password hidden.
        broker: String,
        /// What the AMQP client could not parse.
        #[source]
        source: lapin::Error,
    },
    /// The connection was lost while the call waited for its reply (the
    /// call may or may not have run), or it was down, being re-established,
    /// for the whole of the call's timeout (the call was not sent).
    #[error("connection lost: {0}")]
    Disconnected(String),
    /// The broker connection is closed for good (lost with reconnection
    /// off, or closed by its owner).
    #[error("the broker connection is closed")]
    BrokerLost,
    /// The broker refused to take a request (a negative publisher
    /// confirm: a queue at its length limit with `reject-publish`, say).
    #[error("the broker refused the request for `{server}`")]
    Rejected {
        /// The server id called.
        server: String,
    },
    /// A request too large to send: over the proxy's own limit
    /// (`Proxy::set_max_request_bytes`), refused before anything was
    /// sent, or refused by the broker (over its `max_message_size`:
    /// 16 MiB by default in RabbitMQ 4.x).
    #[error("the request for `{server}` is too large: {reason}")]
    TooLarge {
        /// The server id called.
        server: String,
        /// Whose limit it broke, and what it said.
        reason: String,
    },
    /// A setting is invalid (an AMQP URI, a TLS file, a server id, a
    /// concurrency out of range).
    #[error("configuration: {0}")]
    Config(String),
    /// A thread pool callme needs could not be started.
    #[error("cannot start {what}")]
    Runtime {
        /// Which one.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The plugins directory cannot be followed.
    #[error("cannot watch {}", dir.display())]
    Watch {
        /// The directory.
        dir: std::path::PathBuf,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The task following the plugins directory ended.
    #[error("the plugins directory watcher stopped")]
    WatcherStopped,
    /// The plugin runtime failed (its engine could not be made, or a
    /// plugin could not be loaded where one was required).
    #[error("plugin runtime")]
    Plugin(#[source] PluginError),
    /// A value could not be converted to or from JSON.
    #[error("JSON: {0}")]
    Json(#[source] serde_json::Error),
}

impl Error {
    /// The name this error goes by outside Rust (the `type` of the
    /// command line's JSON errors): a remote error's wire type, or one of
    /// `Timeout`, `NoSuchServer`, `AccessRefused`, `Connection`,
    /// `Config`, `Rejected`, `TooLarge`, `Error`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Error::Remote(r) => r.kind.as_str(),
            Error::Timeout { .. } => "Timeout",
            Error::NoSuchServer(_) => "NoSuchServer",
            Error::AccessRefused(_) => "AccessRefused",
            Error::Connection(_)
            | Error::ConnectTimeout { .. }
            | Error::NotAmqp { .. }
            | Error::Disconnected(_)
            | Error::BrokerLost => "Connection",
            Error::Config(_) => "Config",
            Error::Rejected { .. } => "Rejected",
            Error::TooLarge { .. } => "TooLarge",
            Error::Plugin(e) => e.type_name(),
            Error::Runtime { .. }
            | Error::Watch { .. }
            | Error::WatcherStopped
            | Error::Json(_) => "Error",
        }
    }

    /// The message with its causes, one after the other (`a: b: c`). A
    /// peer that is not AMQP is said to be so, without the parser's
    /// account of the bytes it could not read.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        if matches!(self, Error::NotAmqp { .. }) {
            return text;
        }
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            let more = e.to_string();
            if !text.ends_with(&more) {
                text.push_str(": ");
                text.push_str(&more);
            }
            source = e.source();
        }
        text
    }

    /// The remote error, if the server answered with one.
    pub fn remote(&self) -> Option<&RemoteError> {
        match self {
            Error::Remote(e) => Some(e),
            _ => None,
        }
    }
}
