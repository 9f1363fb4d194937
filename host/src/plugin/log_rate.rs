//! How much of the host's log each plugin's guest output may take a second.
//!
//! One call's output is bounded (see [`super::output`]), but calls come as
//! fast as callers send them: a plugin that prints what it is given,
//! called a few thousand times a second, would write megabytes a second to
//! a log every plugin and every caller shares. Each plugin (by name, its
//! versions together) draws its guest lines from a bucket of
//! [`BURST_BYTES`] refilled at [`BYTES_PER_SECOND`]; a line the bucket
//! cannot pay for is held back and counted, and the count is said, at most
//! once a second, before the next line that is let through.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

/// Guest text a plugin may put in the log each second, on average.
pub(crate) const BYTES_PER_SECOND: usize = 64 << 10;

/// Guest text a plugin may put in the log at once, after a quiet spell.
pub(crate) const BURST_BYTES: usize = 256 << 10;

/// What a line costs beside its text: the time, level, target, span and
/// fields the log writes with it (about 250 bytes for a call's line). A
/// line of little text costs the log that much all the same.
pub(crate) const LINE_BYTES: usize = 256;

/// How often the count of lines held back is said, at most.
const SAY_HELD_EVERY: Duration = Duration::from_secs(1);

struct Bucket {
    /// Bytes that may be written now.
    bytes: f64,
    refilled: Instant,
    held_lines: u64,
    held_bytes: u64,
    said: Option<Instant>,
}

/// What became of a line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Write it.
    Yes,
    /// Write it, after saying that these lines (and bytes) were held back
    /// since it was last said.
    After { lines: u64, bytes: u64 },
    /// Hold it back.
    No,
}

static BUCKETS: LazyLock<Mutex<HashMap<Arc<str>, Bucket>>> = LazyLock::new(Mutex::default);

/// Whether `plugin` may write a line of `len` bytes of guest text now (it
/// costs [`LINE_BYTES`] more).
pub(crate) fn admit(plugin: &Arc<str>, len: usize) -> Admit {
    let len = len.saturating_add(LINE_BYTES);
    let mut buckets = BUCKETS.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    let bucket = buckets.entry(plugin.clone()).or_insert_with(|| Bucket {
        bytes: BURST_BYTES as f64,
        refilled: now,
        held_lines: 0,
        held_bytes: 0,
        said: None,
    });
    admit_at(bucket, len, now)
}

fn admit_at(bucket: &mut Bucket, len: usize, now: Instant) -> Admit {
    let since = now.saturating_duration_since(bucket.refilled).as_secs_f64();
    bucket.bytes = (bucket.bytes + since * BYTES_PER_SECOND as f64).min(BURST_BYTES as f64);
    bucket.refilled = now;
    if (len as f64) > bucket.bytes {
        bucket.held_lines += 1;
        bucket.held_bytes += len as u64;
        return Admit::No;
    }
    bucket.bytes -= len as f64;
    if bucket.held_lines == 0 {
        return Admit::Yes;
    }
    if bucket
        .said
        .is_some_and(|at| now.saturating_duration_since(at) < SAY_HELD_EVERY)
    {
        // Said a moment ago: this one goes out, the count waits.
        return Admit::Yes;
    }
    bucket.said = Some(now);
    let (lines, bytes) = (bucket.held_lines, bucket.held_bytes);
    bucket.held_lines = 0;
    bucket.held_bytes = 0;
    Admit::After { lines, bytes }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(now: Instant) -> Bucket {
        Bucket {
            bytes: BURST_BYTES as f64,
            refilled: now,
            held_lines: 0,
            held_bytes: 0,
            said: None,
        }
    }

    #[test]
    fn a_burst_goes_out_then_the_rate_holds() {
        let start = Instant::now();
        let mut b = fresh(start);
        let line = 4 << 10;
        for _ in 0..BURST_BYTES / line {
            assert_eq!(admit_at(&mut b, line, start), Admit::Yes);
        }
        assert_eq!(admit_at(&mut b, line, start), Admit::No);
        assert_eq!(admit_at(&mut b, line, start), Admit::No);
        // A second later, a second's worth: the count said first.
        let later = start + Duration::from_secs(1);
        assert_eq!(
            admit_at(&mut b, line, later),
            Admit::After {
                lines: 2,
                bytes: 2 * line as u64
            }
        );
        for _ in 1..BYTES_PER_SECOND / line {
            assert_eq!(admit_at(&mut b, line, later), Admit::Yes);
        }
        assert_eq!(admit_at(&mut b, line, later), Admit::No);
        // Refilled to the burst at most, however long the quiet.
        let much_later = later + Duration::from_secs(3600);
        assert!(matches!(
            admit_at(&mut b, BURST_BYTES, much_later),
            Admit::After { lines: 1, .. }
        ));
        assert_eq!(admit_at(&mut b, 1, much_later), Admit::No);
    }

    #[test]
    fn each_plugin_has_a_bucket_of_its_own() {
        let (a, b): (Arc<str>, Arc<str>) = ("log-rate-a".into(), "log-rate-b".into());
        assert_eq!(admit(&a, BURST_BYTES - LINE_BYTES), Admit::Yes);
        assert_eq!(admit(&a, 1 << 10), Admit::No);
        assert_eq!(admit(&b, 1 << 10), Admit::Yes);
    }
}
