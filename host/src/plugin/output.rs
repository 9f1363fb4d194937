//! Captured guest stdout and stderr: bounded, never failing the guest, and bounded again on the way to the log.
//!
//! wasmtime-wasi's memory pipe returns an error once full, which makes a
//! chatty Rust guest panic in `println!`. This sink keeps the first bytes up
//! to its cap, counts and drops the rest, and when the call ends hands the
//! host's log one line per stream (and a trap message the last lines of
//! stderr). Whatever a caller makes a guest print, one call adds at most a
//! few KiB to the host's log.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Most text one log record of guest output carries: a caller can make a
/// guest print as much as `output_bytes` allows on every call, and the log
/// is shared by every plugin and every caller, so it gets a short excerpt
/// and a count of the rest.
pub(crate) const LOG_RECORD_BYTES: usize = 4 << 10;

/// `text` as one log line of at most `cap` bytes: line breaks and other
/// control characters escaped (so guest text cannot forge records of its
/// own or send escape sequences to a terminal), and so are the Unicode
/// line and paragraph separators (which some log viewers break lines at)
/// and the bidirectional controls (which reorder how the text around them
/// reads); cut at a character boundary. Returns the line and how many
/// bytes of `text` were left out.
pub(crate) fn one_line(text: &str, cap: usize) -> (String, usize) {
    let mut line = String::with_capacity(text.len().min(cap));
    for (at, c) in text.char_indices() {
        let before = line.len();
        if (c.is_control() && c != '\t') || hides_how_text_reads(c) {
            // Writing to a String cannot fail.
            let _ = write!(line, "{}", c.escape_default());
        } else {
            line.push(c);
        }
        if line.len() > cap {
            line.truncate(before);
            return (line, text.len() - at);
        }
    }
    (line, 0)
}

/// U+2028 and U+2029, and the bidirectional formatting characters
/// (Unicode Standard Annex #9: U+061C, U+200E, U+200F, U+202A to U+202E,
/// U+2066 to U+2069).
fn hides_how_text_reads(c: char) -> bool {
    matches!(
        c,
        '\u{2028}'
            | '\u{2029}'
            | '\u{061C}'
            | '\u{200E}'
            | '\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2066}'..='\u{2069}'
    )
}

/// One stream's output of a call, as it goes to the log.
pub(crate) struct Excerpt {
    /// The first [`LOG_RECORD_BYTES`] of it, as one line.
    pub(crate) line: String,
    /// Bytes written but not in `line`.
    pub(crate) dropped_bytes: usize,
    /// Lines (whole or in part) written but not in `line`.
    pub(crate) dropped_lines: usize,
}

#[derive(Default)]
struct Captured {
    /// The first bytes, up to the cap.
    kept: Vec<u8>,
    /// Bytes written past the cap, and the line breaks among them.
    over: usize,
    over_newlines: usize,
    /// The last byte written, to tell whether the output ends a line.
    last: Option<u8>,
}

/// One captured stream. Clones share the buffer.
#[derive(Clone)]
pub(crate) struct CapturedOutput {
    cap: usize,
    buf: Arc<Mutex<Captured>>,
}

impl CapturedOutput {
    pub(crate) fn new(cap: usize) -> Self {
        CapturedOutput {
            cap,
            buf: Arc::new(Mutex::new(Captured::default())),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Captured> {
        // A poisoned lock only means another writer panicked mid-push; the
        // bytes are still a valid prefix, so keep going.
        self.buf.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, bytes: &[u8]) {
        let mut buf = self.lock();
        let room = self.cap.saturating_sub(buf.kept.len());
        let (kept, over) = bytes.split_at(bytes.len().min(room));
        buf.kept.extend_from_slice(kept);
        buf.over += over.len();
        buf.over_newlines += over.iter().filter(|b| **b == b'\n').count();
        if let Some(&last) = bytes.last() {
            buf.last = Some(last);
        }
    }

    /// Takes what the guest wrote since the last take, as one log line;
    /// `None` when that is nothing worth a record (blank, or nothing kept).
    pub(crate) fn take_excerpt(&self) -> Option<Excerpt> {
        let captured = std::mem::take(&mut *self.lock());
        let text = String::from_utf8_lossy(&captured.kept);
        // Trailing blanks are how output ends, not worth a count of their own.
        let body = text.trim_end();
        let (line, left_out) = one_line(body, LOG_RECORD_BYTES);
        if line.trim().is_empty() {
            return None;
        }
        let shown = body.len() - left_out;
        let dropped = if left_out > 0 || captured.over > 0 {
            &text[shown..]
        } else {
            ""
        };
        let dropped_bytes = dropped.len() + captured.over;
        // A break right after the cut ends a line that was shown.
        let rest = dropped
            .strip_prefix("\r\n")
            .or_else(|| dropped.strip_prefix('\n'))
            .unwrap_or(dropped);
        let dropped_lines = if dropped_bytes == 0 {
            0
        } else {
            let breaks = rest.matches('\n').count() + captured.over_newlines;
            breaks + usize::from(captured.last != Some(b'\n'))
        };
        Some(Excerpt {
            line,
            dropped_bytes,
            dropped_lines,
        })
    }

    /// Forgets what the guest wrote so far.
    pub(crate) fn clear(&self) {
        *self.lock() = Captured::default();
    }

    /// What the guest wrote (as far as kept), lossily decoded.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.lock().kept).into_owned()
    }
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for CapturedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_escapes_breaks_and_control_characters() {
        assert_eq!(
            one_line("a\nb\r\n\u{1b}[2Jc\td", 100),
            ("a\\nb\\r\\n\\u{1b}[2Jc\td".into(), 0)
        );
        // Cut at a character boundary, never inside an escape.
        assert_eq!(
            one_line("a\u{2028}b\u{2029}c\u{202E}d\u{2066}e\u{200F}f", 100).0,
            "a\\u{2028}b\\u{2029}c\\u{202e}d\\u{2066}e\\u{200f}f"
        );
        assert_eq!(one_line("héllo", 2), ("h".into(), 5));
        assert_eq!(one_line("ab\ncd", 3), ("ab".into(), 3));
        assert_eq!(one_line("", 0), (String::new(), 0));
    }

    #[test]
    fn one_record_per_stream_with_what_was_dropped() {
        let out = CapturedOutput::new(64 << 10);
        out.push(b"hello\n");
        let x = out.take_excerpt().unwrap();
        assert_eq!(
            (x.line.as_str(), x.dropped_bytes, x.dropped_lines),
            ("hello", 0, 0)
        );
        assert!(out.take_excerpt().is_none(), "taken");

        // 64 KiB of "a\n": one line of at most LOG_RECORD_BYTES.
        for _ in 0..(32 << 10) {
            out.push(b"a\n");
        }
        let x = out.take_excerpt().unwrap();
        assert!(x.line.len() <= LOG_RECORD_BYTES, "{}", x.line.len());
        assert!(x.line.starts_with("a\\na\\n"));
        // 1366 lines shown ("a\n" is 3 bytes escaped; the 1366th without
        // its break), the other 32768 - 1366 dropped.
        assert_eq!(x.line.len(), 4096);
        assert_eq!(x.dropped_bytes, (64 << 10) - (2 * 1366 - 1));
        assert_eq!(x.dropped_lines, (32 << 10) - 1366);

        // Past the cap: counted, not kept.
        let small = CapturedOutput::new(4);
        small.push(b"one\ntwo\nthree");
        let x = small.take_excerpt().unwrap();
        assert_eq!(x.line, "one");
        assert_eq!((x.dropped_bytes, x.dropped_lines), (10, 2));

        out.push(b" \n\n");
        assert!(out.take_excerpt().is_none(), "blank output is no record");
        out.push(b"x");
        out.clear();
        assert!(out.take_excerpt().is_none());
    }
}
