//! Label sets shared by the host's and a caller's call metrics, and label values as the Prometheus text format needs them.
//!
//! The encoder writes label values as they are; a quote, a backslash or
//! a line break in one would break the line it is on. Server ids and WIT
//! names never hold one, but native function names are whatever the code
//! registered, and a caller's are its own.

use std::borrow::Cow;

use prometheus_client::encoding::EncodeLabelSet;

/// A call's server id, function and outcome (`ok` or an error type).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct CallLabels {
    pub(super) server_id: String,
    pub(super) function: String,
    pub(super) outcome: &'static str,
}

/// A call's server id and function.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct FunctionLabels {
    pub(super) server_id: String,
    pub(super) function: String,
}

/// `value`, escaped for a label value.
pub(super) fn escaped(value: &str) -> Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(value);
    }
    Cow::Owned(
        value
            .replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n"),
    )
}
