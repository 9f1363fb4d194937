//! Label values as the Prometheus text format needs them.
//!
//! The encoder writes label values as they are; a quote, a backslash or
//! a line break in one would break the line it is on. Server ids and WIT
//! names never hold one, but native function names are whatever the code
//! registered, and a caller's are its own.

use std::borrow::Cow;

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
