//! Calls to functions of other callme servers (`callme:plugin/rpc@0.2.0`), with serde arguments and results.
//!
//! A plugin on `callme:plugin@0.2.0` whose sidecar grants it
//! (`rpc = ["calc"]`, or `"*"` for any server) calls through the host's
//! broker connection:
//!
//! ```ignore
//! let sum: i64 = callme_guest::rpc::call("calc", "add", (1, 2))?;
//! ```
//!
//! The call waits at most what is left of the current call's deadline,
//! and the guest spends no fuel while it waits. Every failure comes back
//! as an [`Error`]: the server's own error, the caller's
//! (`NoSuchServer`, `Timeout`), or the host's refusal before anything is
//! sent (`NotGranted`, `CallDepthExceeded`, `TooManyCalls`).

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Why a call failed, as a remote caller would see it (see
/// `docs/protocol.md`).
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteError {
    /// The error's type: `GuestError`, `NoSuchFunction`,
    /// `InvalidArguments`, `Timeout`, `NoSuchServer`, `NotGranted`,
    /// `CallDepthExceeded`, `TooManyCalls`, ...
    pub kind: String,
    /// What went wrong, for people.
    pub message: String,
    /// The error's data (a `GuestError`'s payload), if any.
    pub data: Option<Value>,
}

/// Why [`call`] failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// The call failed: refused by the host, or answered with an error.
    Remote(RemoteError),
    /// The arguments did not serialise to JSON.
    Arguments(serde_json::Error),
    /// The result did not deserialise into the type asked for.
    Result(serde_json::Error),
}

impl Error {
    /// The error's type, as in [`RemoteError::kind`]; `Arguments` and
    /// `Result` for the plugin's own conversions.
    pub fn kind(&self) -> &str {
        match self {
            Error::Remote(e) => &e.kind,
            Error::Arguments(_) => "Arguments",
            Error::Result(_) => "Result",
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Remote(e) => write!(f, "{}: {}", e.kind, e.message),
            Error::Arguments(e) => write!(f, "the arguments do not serialise to JSON: {e}"),
            Error::Result(e) => write!(f, "the result does not deserialise: {e}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Remote(_) => None,
            Error::Arguments(e) | Error::Result(e) => Some(e),
        }
    }
}

/// Calls `func` of `server` with `args` and deserialises its result.
///
/// `args` serialises to the call's arguments: a tuple or array gives
/// positional arguments (`(1, 2)`), a struct or map keyword arguments,
/// `()` none, any other value one positional argument. `()` is JSON
/// `null`, so any value that serialises to `null` (`None`, a NaN) also
/// gives none: pass one `null` argument as a tuple of one,
/// `(None::<i64>,)`.
///
/// # Errors
///
/// [`Error::Remote`] when the host refuses the call or the server answers
/// with an error; [`Error::Arguments`] or [`Error::Result`] when the
/// values do not convert.
pub fn call<A: Serialize, R: DeserializeOwned>(
    server: &str,
    func: &str,
    args: A,
) -> Result<R, Error> {
    let args = match serde_json::to_value(args).map_err(Error::Arguments)? {
        Value::Null => Value::Array(Vec::new()),
        list @ (Value::Array(_) | Value::Object(_)) => list,
        single => Value::Array(vec![single]),
    };
    let result = call_json(server, func, &args)?;
    serde_json::from_value(result).map_err(Error::Result)
}

/// Calls `func` of `server` with JSON arguments (an array of positional
/// arguments, or an object of keyword arguments); the JSON result.
///
/// # Errors
///
/// As [`call`]: [`Error::Remote`].
pub fn call_json(server: &str, func: &str, args: &Value) -> Result<Value, Error> {
    let text = raw_call(server, func, &args.to_string())?;
    // The host sends JSON it decoded itself.
    serde_json::from_str(&text).map_err(Error::Result)
}

#[cfg(target_arch = "wasm32")]
fn raw_call(server: &str, func: &str, args: &str) -> Result<String, Error> {
    crate::v0_2::rpc::call(server, func, args).map_err(|e| {
        Error::Remote(RemoteError {
            kind: e.type_,
            message: e.message,
            data: e
                .data
                .map(|d| serde_json::from_str(&d).unwrap_or(Value::String(d))),
        })
    })
}

/// Off wasm there is no host to call through.
#[cfg(not(target_arch = "wasm32"))]
fn raw_call(_server: &str, _func: &str, _args: &str) -> Result<String, Error> {
    Err(Error::Remote(RemoteError {
        kind: "Unavailable".into(),
        message: "no host: calls to other servers work only inside a served plugin".into(),
        data: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natively_a_call_fails_with_a_typed_error() {
        let e = call::<_, i64>("calc", "add", (1, 2)).unwrap_err();
        assert_eq!(e.kind(), "Unavailable");
        assert!(e.to_string().starts_with("Unavailable: "), "{e}");
    }
}
