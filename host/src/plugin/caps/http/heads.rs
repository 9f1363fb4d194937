//! What the response heads a plugin's requests bring in may hold of the host's memory, per call and per kept instance.
//!
//! A response's head (its headers) is held by the host, outside the
//! guest's memory and limits, for as long as the guest keeps the
//! response: up to twice hyper's read buffer each (`send.rs`), and as
//! many as the store's handle limit lets a guest keep. So the heads a
//! call receives count against [`CALL_HEAD_BYTES`]: a head past it is
//! refused (`HttpResponseHeaderSectionSize`) and its connection closed.
//! A guest may keep responses from one call to the next in an instance
//! kept between calls (`reuse_instances`), so the heads an instance has
//! received over its life count too: past [`INSTANCE_HEAD_BYTES`] it is
//! not kept after its call, and the next call gets a fresh one. What a
//! kept instance holds in heads is so at most the sum of the two.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hyper::http::HeaderMap;
use wasmtime_wasi_http::Error as HttpError;

/// Bytes of response heads one call may receive: 256 requests (the
/// default `http_max_requests`) with 16 KiB of headers each.
pub(crate) const CALL_HEAD_BYTES: usize = 4 << 20;

/// Bytes of response heads an instance may have received over its life
/// and still be kept for another call.
pub(crate) const INSTANCE_HEAD_BYTES: usize = 16 << 20;

/// What a header costs beyond its name and value (the map's entry).
const PER_HEADER_BYTES: usize = 32;

/// The heads the call being served and its instance have received.
#[derive(Clone, Default)]
pub(super) struct Heads {
    call: Arc<AtomicUsize>,
    instance: Arc<AtomicUsize>,
}

impl Heads {
    /// For the instance's next call: a count of its own, the instance's
    /// carried on.
    pub(super) fn next_call(&self) -> Heads {
        Heads {
            call: Arc::default(),
            instance: self.instance.clone(),
        }
    }

    /// Counts a response's `headers`, or refuses them when the call has
    /// received its share.
    pub(super) fn take(&self, headers: &HeaderMap) -> Result<(), HttpError> {
        let size = head_size(headers);
        let before = self.call.fetch_add(size, Ordering::Relaxed);
        if before.saturating_add(size) > CALL_HEAD_BYTES {
            self.call.fetch_sub(size, Ordering::Relaxed);
            return Err(HttpError::HttpResponseHeaderSectionSize(
                u32::try_from(size).ok(),
            ));
        }
        self.instance.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    /// Whether the instance has received more than it may and be kept.
    pub(super) fn instance_spent(&self) -> bool {
        self.instance.load(Ordering::Relaxed) > INSTANCE_HEAD_BYTES
    }
}

/// What `headers` hold, about.
fn head_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + PER_HEADER_BYTES)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::http::HeaderValue;

    fn head(bytes: usize) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_str(&"x".repeat(bytes)).unwrap();
        headers.insert("x-padding", value);
        headers
    }

    #[test]
    fn a_call_receives_its_share_and_an_instance_is_spent_after_its_own() {
        let heads = Heads::default();
        let big = head(1 << 20);
        for _ in 0..3 {
            heads.take(&big).unwrap();
        }
        // The fourth would pass the call's 4 MiB (with the entries' cost).
        assert!(matches!(
            heads.take(&big),
            Err(HttpError::HttpResponseHeaderSectionSize(Some(_)))
        ));
        // A refused head is not counted: a small one still fits.
        heads.take(&head(1000)).unwrap();
        assert!(!heads.instance_spent());
        let mut call = heads.clone();
        for _ in 0..4 {
            call = call.next_call();
            for _ in 0..3 {
                call.take(&big).unwrap();
            }
        }
        // 15 MiB and a bit: not yet spent; 3 more are.
        assert!(!call.instance_spent());
        call = call.next_call();
        call.take(&big).unwrap();
        assert!(call.instance_spent());
        assert!(heads.instance_spent(), "the count is the instance's");
    }
}
