//! What the response heads (and trailers) a plugin's requests bring in may hold of the host's memory, per call and per kept instance.
//!
//! A response's head (its headers) is held by the host, outside the
//! guest's memory and limits, for as long as the guest keeps the
//! response: up to twice hyper's read buffer each (`send.rs`), and as
//! many as the store's handle limit lets a guest keep. So the heads a
//! call receives count against [`CALL_HEAD_BYTES`], each as its headers or
//! as what its connection had read with it, if more (`read_count.rs`:
//! the part of the body read with a head keeps the buffer it was read
//! into, whatever the headers hold once made their own): a head past it is
//! refused (`HttpResponseHeaderSectionSize`) and its connection closed.
//! A guest may keep responses from one call to the next in an instance
//! kept between calls (`reuse_instances`), so the heads an instance has
//! received over its life count too: past [`INSTANCE_HEAD_BYTES`] it is
//! not kept after its call, and the next call gets a fresh one. What a
//! kept instance holds in heads is so at most the sum of the two.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use hyper::http::{self, HeaderMap, HeaderValue};
use wasmtime_wasi_http::Error as HttpError;

use super::read_count::ReadWithHead;

/// Bytes of response heads one call may receive: 256 requests (the
/// default `http_max_requests`) with 16 KiB of headers each, their bodies
/// read (one held unread counts what hyper read with it too, 24 KiB for
/// such a head).
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

    /// Counts a response's head, or refuses it when the call has received
    /// its share. What the response keeps is made its own: hyper's header
    /// values are slices of its whole read buffer (up to twice
    /// `send::MAX_HEAD_BYTES`), so a value of one byte written after 60 KiB
    /// of blanks held those 60 KiB, and so did extensions made from it.
    ///
    /// A head counts as what its headers hold, or as what its connection
    /// had read with it ([`ReadWithHead`]) if that is more: the part of the
    /// body read with the head keeps hyper's whole read buffer.
    ///
    /// What is counted beyond the headers (the part of the buffer the body
    /// holds) is given back with [`Heads::give_back`] once the body no
    /// longer holds it: `Ok` says how much that is.
    pub(super) fn take<B>(&self, response: &mut http::Response<B>) -> Result<usize, HttpError> {
        let read = response
            .extensions()
            .get::<ReadWithHead>()
            .map_or(0, |read| read.0);
        response.extensions_mut().clear();
        let headers = owned(response.headers());
        *response.headers_mut() = headers;
        let headers = head_size(response.headers());
        let size = headers.max(read);
        self.count(size)
            .map_err(|()| HttpError::HttpResponseHeaderSectionSize(u32::try_from(size).ok()))?;
        Ok(size - headers)
    }

    /// Gives back `bytes` counted by [`Heads::take`] beyond a head's
    /// headers, once the buffer they stood for is let go.
    pub(super) fn give_back(&self, bytes: usize) {
        self.call.fetch_sub(bytes, Ordering::Relaxed);
        self.instance.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Counts a response's trailers as [`Heads::take`] counts a head, or
    /// refuses them (`HttpResponseTrailerSectionSize`) when the call has
    /// received its share: the guest keeps them as long as it keeps the
    /// body's handle. Their values are made their own.
    pub(super) fn take_trailers(&self, trailers: &mut HeaderMap) -> Result<(), HttpError> {
        *trailers = owned(trailers);
        let size = head_size(trailers);
        self.count(size)
            .map_err(|()| HttpError::HttpResponseTrailerSectionSize(u32::try_from(size).ok()))
    }

    /// Adds `size` to the call's and the instance's counts, unless it
    /// takes the call's past [`CALL_HEAD_BYTES`].
    fn count(&self, size: usize) -> Result<(), ()> {
        let before = self.call.fetch_add(size, Ordering::Relaxed);
        if before.saturating_add(size) > CALL_HEAD_BYTES {
            self.call.fetch_sub(size, Ordering::Relaxed);
            return Err(());
        }
        self.instance.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    /// Whether the instance has received more than it may and be kept.
    pub(super) fn instance_spent(&self) -> bool {
        self.instance.load(Ordering::Relaxed) > INSTANCE_HEAD_BYTES
    }
}

/// `headers` with values of their own, sharing no buffer. A value that
/// is already valid stays valid.
fn owned(headers: &HeaderMap) -> HeaderMap {
    let mut own = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if let Ok(mut copy) = HeaderValue::from_bytes(value.as_bytes()) {
            copy.set_sensitive(value.is_sensitive());
            own.append(name.clone(), copy);
        }
    }
    own
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

    fn response(headers: HeaderMap) -> http::Response<()> {
        let mut response = http::Response::new(());
        *response.headers_mut() = headers;
        response
    }

    #[test]
    fn a_kept_head_holds_no_part_of_the_buffer_it_was_read_from() {
        // As hyper reads a head: values are slices of its read buffer.
        let buffer = bytes::Bytes::from(vec![b'b'; 64 << 10]);
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_maybe_shared(buffer.slice(0..1)).unwrap();
        headers.insert("x-a", value);
        let mut kept = response(headers);
        kept.extensions_mut().insert(buffer.slice(1..2));
        assert!(!buffer.is_unique());
        Heads::default().take(&mut kept).unwrap();
        assert!(
            buffer.is_unique(),
            "the response still holds its read buffer"
        );
        assert_eq!(kept.headers()["x-a"], "b");
    }

    #[test]
    fn a_head_counts_as_what_was_read_with_it_when_that_is_more() {
        let heads = Heads::default();
        // 60 KiB of spaces around a one-byte value, as read.
        let padded = || {
            let mut r = response(head(1));
            r.extensions_mut().insert(ReadWithHead(60 << 10));
            r
        };
        let mut taken = 0;
        while heads.take(&mut padded()).is_ok() {
            taken += 1;
        }
        assert_eq!(taken, CALL_HEAD_BYTES / (60 << 10));
        // Headers holding more than was read (their entries' cost) count
        // as their own.
        let fresh = Heads::default();
        let mut big = response(head(100 << 10));
        big.extensions_mut().insert(ReadWithHead(1));
        assert_eq!(fresh.take(&mut big).unwrap(), 0);
        assert!(fresh.call.load(Ordering::Relaxed) > 100 << 10);
        // What was counted beyond the headers is given back.
        let heads = Heads::default();
        let beyond = heads.take(&mut padded()).unwrap();
        assert!(beyond > 59 << 10, "{beyond}");
        heads.give_back(beyond);
        assert!(heads.call.load(Ordering::Relaxed) < 1 << 10);
        assert!(heads.instance.load(Ordering::Relaxed) < 1 << 10);
    }

    #[test]
    fn a_call_receives_its_share_and_an_instance_is_spent_after_its_own() {
        let heads = Heads::default();
        let big = || response(head(1 << 20));
        for _ in 0..3 {
            heads.take(&mut big()).unwrap();
        }
        // The fourth would pass the call's 4 MiB (with the entries' cost).
        assert!(matches!(
            heads.take(&mut big()),
            Err(HttpError::HttpResponseHeaderSectionSize(Some(_)))
        ));
        // A refused head is not counted: a small one still fits.
        heads.take(&mut response(head(1000))).unwrap();
        assert!(!heads.instance_spent());
        let mut call = heads.clone();
        for _ in 0..4 {
            call = call.next_call();
            for _ in 0..3 {
                call.take(&mut big()).unwrap();
            }
        }
        // 15 MiB and a bit: not yet spent; 3 more are.
        assert!(!call.instance_spent());
        call = call.next_call();
        call.take(&mut big()).unwrap();
        assert!(call.instance_spent());
        assert!(heads.instance_spent(), "the count is the instance's");
    }
}
