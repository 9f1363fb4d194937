//! W3C trace context: the `traceparent` and `tracestate` headers a call carries.
//!
//! A request carries the caller's trace in its AMQP headers table, as the
//! W3C "Trace Context" recommendation writes it for HTTP and as the
//! OpenTelemetry instrumentations of other AMQP clients (pika, aio-pika)
//! put it in message headers. The proxy sends the caller's
//! [`TraceContext`] (see [`crate::ServerProxy::with_trace`]) or a fresh
//! one; the server continues it in a span of its own for the call, so its
//! log lines carry the trace id, and replies with its own span's
//! `traceparent`. Only version `00` is written; a later version is read as
//! far as `00` defines it, as the recommendation asks. This module knows
//! the format and the headers, not OpenTelemetry: a caller using it passes
//! its span's ids through [`TraceContext::from_ids`] or a `traceparent`
//! string through [`TraceContext::parse`].

use std::fmt;
use std::sync::Arc;

use lapin::types::{AMQPValue, FieldTable};

/// The header that carries the trace id, the sender's span id and the
/// sampled flag.
pub(crate) const TRACEPARENT: &str = "traceparent";

/// The header that carries vendors' own trace data, passed on untouched.
pub(crate) const TRACESTATE: &str = "tracestate";

/// The longest `tracestate` passed on: the recommendation asks every hop
/// to pass on at least 512 characters; a longer one is left out whole,
/// since cutting it must respect its list members.
const MAX_TRACESTATE: usize = 512;

/// The length of a version `00` `traceparent`: `00-` 32 hex `-` 16 hex `-` 2 hex.
const TRACEPARENT_LEN: usize = 55;

/// The sampled bit of `trace-flags`: the caller may have recorded its span.
const SAMPLED: u8 = 0x01;

/// A trace id: 16 bytes, never all zero. Displays as 32 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 16]);

/// A span id: 8 bytes, never all zero. Displays as 16 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId([u8; 8]);

impl TraceId {
    /// The id of these bytes, unless they are all zero (an invalid id).
    pub fn from_bytes(bytes: [u8; 16]) -> Option<TraceId> {
        (bytes != [0; 16]).then_some(TraceId(bytes))
    }

    /// The id's bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// A random id: the bytes of a v4 UUID, 122 of them random.
    fn random() -> TraceId {
        loop {
            if let Some(id) = TraceId::from_bytes(uuid::Uuid::new_v4().into_bytes()) {
                return id;
            }
        }
    }
}

impl SpanId {
    /// The id of these bytes, unless they are all zero (an invalid id).
    pub fn from_bytes(bytes: [u8; 8]) -> Option<SpanId> {
        (bytes != [0; 8]).then_some(SpanId(bytes))
    }

    /// The id's bytes.
    pub fn to_bytes(self) -> [u8; 8] {
        self.0
    }

    /// A random id, from the random bytes of a v4 UUID (the ones that do
    /// not hold its version and variant bits).
    fn random() -> SpanId {
        loop {
            let b = uuid::Uuid::new_v4().into_bytes();
            let bytes = [b[0], b[1], b[2], b[3], b[4], b[5], b[10], b[11]];
            if let Some(id) = SpanId::from_bytes(bytes) {
                return id;
            }
        }
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// Where a call stands in a distributed trace: its trace id, the span it
/// was sent from, whether that span may be recorded, and the vendors'
/// `tracestate`.
///
/// Its [`Display`](fmt::Display) is the `traceparent` header (version `00`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    trace_id: TraceId,
    span_id: SpanId,
    sampled: bool,
    /// Shared, so that a context given to every call of a `ServerProxy`
    /// costs no copy.
    state: Option<Arc<str>>,
}

impl TraceContext {
    /// A new trace: random trace and span ids, not sampled (nothing
    /// records it), no `tracestate`.
    pub fn new_trace() -> TraceContext {
        TraceContext {
            trace_id: TraceId::random(),
            span_id: SpanId::random(),
            sampled: false,
            state: None,
        }
    }

    /// The context of the span `span_id` of the trace `trace_id`: what an
    /// OpenTelemetry `SpanContext` holds (`trace_id().to_bytes()`,
    /// `span_id().to_bytes()`, `is_sampled()`). `None` when either id is
    /// all zero.
    pub fn from_ids(trace_id: [u8; 16], span_id: [u8; 8], sampled: bool) -> Option<TraceContext> {
        Some(TraceContext {
            trace_id: TraceId::from_bytes(trace_id)?,
            span_id: SpanId::from_bytes(span_id)?,
            sampled,
            state: None,
        })
    }

    /// Reads a `traceparent` header value. `None` when it is not one: a
    /// wrong length, a character that is not lowercase hex, an all-zero
    /// id, version `ff`. A version above `00` is read as far as `00`
    /// defines it, provided what follows is a `-`.
    pub fn parse(traceparent: &str) -> Option<TraceContext> {
        TraceContext::parse_bytes(traceparent.as_bytes())
    }

    fn parse_bytes(s: &[u8]) -> Option<TraceContext> {
        if s.len() < TRACEPARENT_LEN {
            return None;
        }
        let version = hex_byte(&s[0..2])?;
        match version {
            0xff => return None,
            0x00 if s.len() != TRACEPARENT_LEN => return None,
            // A later version may add fields, after a dash.
            _ if s.len() > TRACEPARENT_LEN && s[TRACEPARENT_LEN] != b'-' => return None,
            _ => {}
        }
        if s[2] != b'-' || s[35] != b'-' || s[52] != b'-' {
            return None;
        }
        let mut trace_id = [0; 16];
        for (i, b) in trace_id.iter_mut().enumerate() {
            *b = hex_byte(&s[3 + 2 * i..5 + 2 * i])?;
        }
        let mut span_id = [0; 8];
        for (i, b) in span_id.iter_mut().enumerate() {
            *b = hex_byte(&s[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&s[53..55])?;
        TraceContext::from_ids(trace_id, span_id, flags & SAMPLED != 0)
    }

    /// The same context with this `tracestate`, passed on as it is. A
    /// value longer than 512 bytes, empty, or with characters outside
    /// printable ASCII and tabs (the optional white space around its
    /// commas, W3C Trace Context, "tracestate Header Field Values") is left
    /// out, as if there were none.
    pub fn with_tracestate(mut self, tracestate: &str) -> TraceContext {
        let tracestate = tracestate.trim_matches([' ', '\t']);
        let valid = !tracestate.is_empty()
            && tracestate.len() <= MAX_TRACESTATE
            && tracestate
                .bytes()
                .all(|b| b == b'\t' || (0x20..0x7f).contains(&b));
        self.state = valid.then(|| tracestate.into());
        self
    }

    /// The same context, sampled or not.
    pub fn with_sampled(mut self, sampled: bool) -> TraceContext {
        self.sampled = sampled;
        self
    }

    /// The context of a new span of the same trace, below this one: same
    /// trace id, sampled flag and `tracestate`, a new random span id.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            span_id: SpanId::random(),
            ..self.clone()
        }
    }

    /// The trace id.
    pub fn trace_id(&self) -> TraceId {
        self.trace_id
    }

    /// The span this context was sent from (`parent-id` in the header).
    pub fn span_id(&self) -> SpanId {
        self.span_id
    }

    /// Whether the sender may have recorded its span.
    pub fn sampled(&self) -> bool {
        self.sampled
    }

    /// The vendors' `tracestate`, when there is one.
    pub fn tracestate(&self) -> Option<&str> {
        self.state.as_deref()
    }

    /// The `traceparent` header value (version `00`).
    pub fn traceparent(&self) -> String {
        self.to_string()
    }

    /// The context a message's headers carry: `None` when they have no
    /// `traceparent`, or one that is not valid (its `tracestate` is then
    /// ignored too, as the recommendation says). Only a server reads them.
    #[cfg(feature = "server")]
    pub(crate) fn from_headers(headers: Option<&FieldTable>) -> Option<TraceContext> {
        let headers = headers?.inner();
        let context = TraceContext::parse_bytes(header_bytes(headers.get(TRACEPARENT)?)?)?;
        match headers.get(TRACESTATE).and_then(header_bytes) {
            Some(state) => match std::str::from_utf8(state) {
                Ok(state) => Some(context.with_tracestate(state)),
                Err(_) => Some(context),
            },
            None => Some(context),
        }
    }

    /// The headers a message sent from this context carries.
    pub(crate) fn headers(&self) -> FieldTable {
        let mut table = FieldTable::default();
        table.insert(
            TRACEPARENT.into(),
            AMQPValue::LongString(self.traceparent().into()),
        );
        if let Some(state) = self.tracestate() {
            table.insert(TRACESTATE.into(), AMQPValue::LongString(state.into()));
        }
        table
    }
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let flags = if self.sampled { SAMPLED } else { 0 };
        write!(f, "00-{}-{}-{flags:02x}", self.trace_id, self.span_id)
    }
}

/// A header's value as bytes: other clients send strings as long strings
/// (pika, aio-pika) or short ones.
#[cfg(feature = "server")]
fn header_bytes(value: &AMQPValue) -> Option<&[u8]> {
    match value {
        AMQPValue::LongString(s) => Some(s.as_bytes()),
        AMQPValue::ShortString(s) => Some(s.as_str().as_bytes()),
        _ => None,
    }
}

/// Two lowercase hex digits as a byte: uppercase is not valid in a
/// `traceparent`.
fn hex_byte(two: &[u8]) -> Option<u8> {
    fn digit(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        }
    }
    Some(digit(two[0])? << 4 | digit(two[1])?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The recommendation's own example.
    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_reads_and_writes_back_the_same() {
        let t = TraceContext::parse(EXAMPLE).expect("valid");
        assert_eq!(t.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.span_id().to_string(), "00f067aa0ba902b7");
        assert!(t.sampled());
        assert_eq!(t.tracestate(), None);
        assert_eq!(t.traceparent(), EXAMPLE);

        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let t = TraceContext::parse(unsampled).expect("valid");
        assert!(!t.sampled());
        assert_eq!(t.to_string(), unsampled);
    }

    #[test]
    fn only_the_sampled_flag_is_kept() {
        // Other bits are not defined by version 00: they are not passed on.
        let t = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-03")
            .expect("valid");
        assert!(t.sampled());
        assert!(t.traceparent().ends_with("-01"));
        let t = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-02")
            .expect("valid");
        assert!(!t.sampled());
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        let bad = [
            // Wrong length.
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-011",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            // Version 00 has nothing after the flags.
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            // Uppercase hex.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "0A-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // All-zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Version ff is invalid.
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            // Wrong separators, not hex.
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-é",
        ];
        for s in bad {
            assert_eq!(TraceContext::parse(s), None, "{s:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_as_far_as_version_00_goes() {
        let t =
            TraceContext::parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-not")
                .expect("a later version with more fields");
        assert_eq!(t.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(t.sampled());
        // Sent on as the version this side knows.
        assert_eq!(t.traceparent(), EXAMPLE);
        assert!(
            TraceContext::parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .is_some()
        );
        // What follows the flags must start with a dash.
        assert_eq!(
            TraceContext::parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"),
            None
        );
    }

    #[test]
    fn a_child_keeps_the_trace_and_gets_its_own_span() {
        let parent = TraceContext::parse(EXAMPLE)
            .expect("valid")
            .with_tracestate("congo=t61rcWkgMzE");
        let child = parent.child();
        assert_eq!(child.trace_id(), parent.trace_id());
        assert_ne!(child.span_id(), parent.span_id());
        assert!(child.sampled());
        assert_eq!(child.tracestate(), Some("congo=t61rcWkgMzE"));
    }

    #[test]
    fn new_traces_are_valid_and_distinct() {
        let a = TraceContext::new_trace();
        let b = TraceContext::new_trace();
        assert_ne!(a.trace_id(), b.trace_id());
        assert_ne!(a.span_id(), b.span_id());
        assert!(!a.sampled());
        let again = TraceContext::parse(&a.traceparent()).expect("a new trace parses");
        assert_eq!(again, a);
    }

    #[test]
    fn from_ids_refuses_zero_ids() {
        assert!(TraceContext::from_ids([0; 16], [1; 8], true).is_none());
        assert!(TraceContext::from_ids([1; 16], [0; 8], true).is_none());
        let t = TraceContext::from_ids([0xab; 16], [0x01; 8], true).expect("valid");
        assert_eq!(
            t.traceparent(),
            "00-abababababababababababababababab-0101010101010101-01"
        );
    }

    #[test]
    fn tracestate_travels_only_when_sane() {
        let t = TraceContext::new_trace();
        assert_eq!(
            t.clone()
                .with_tracestate(" rojo=00f067aa0ba902b7 ")
                .tracestate(),
            Some("rojo=00f067aa0ba902b7")
        );
        assert_eq!(
            t.clone().with_tracestate("a=1,\tb=2").tracestate(),
            Some("a=1,\tb=2")
        );
        assert_eq!(t.clone().with_tracestate("").tracestate(), None);
        assert_eq!(t.clone().with_tracestate("a=\u{1}").tracestate(), None);
        assert_eq!(
            t.clone().with_tracestate(&"a".repeat(513)).tracestate(),
            None
        );
    }

    #[test]
    #[cfg(feature = "server")]
    fn headers_carry_the_context_and_read_back() {
        let t = TraceContext::parse(EXAMPLE)
            .expect("valid")
            .with_tracestate("congo=t61rcWkgMzE");
        let headers = t.headers();
        assert_eq!(TraceContext::from_headers(Some(&headers)), Some(t));

        // Another client's short string; a malformed traceparent drops
        // its tracestate with it.
        let mut other = FieldTable::default();
        other.insert(TRACEPARENT.into(), AMQPValue::ShortString(EXAMPLE.into()));
        assert!(TraceContext::from_headers(Some(&other)).is_some());
        let mut bad = FieldTable::default();
        bad.insert(TRACEPARENT.into(), AMQPValue::LongString("00-zz".into()));
        bad.insert(TRACESTATE.into(), AMQPValue::LongString("a=b".into()));
        assert_eq!(TraceContext::from_headers(Some(&bad)), None);
        assert_eq!(TraceContext::from_headers(None), None);
        let mut number = FieldTable::default();
        number.insert(TRACEPARENT.into(), AMQPValue::LongInt(7));
        assert_eq!(TraceContext::from_headers(Some(&number)), None);
    }
}
