//! Calls waiting for their replies, by correlation id.
//!
//! A reply is handed over as its body, read by the call that waits for
//! it: a large one costs its own call the time to read it, not the task
//! that takes every reply of the proxy. A call registers before it publishes and is forgotten however it ends
//! (answered, timed out, dropped), so a late reply finds nobody and is
//! dropped. When the reply queue goes with a lost connection, every call
//! waiting is failed at once rather than left to its timeout.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::oneshot;

/// A reply's body, as it came.
pub(super) type Body = Vec<u8>;

/// The calls waiting, each with where its reply goes.
#[derive(Default)]
pub(super) struct Pending(Mutex<HashMap<String, oneshot::Sender<Body>>>);

impl Pending {
    /// Registers a call under `corr`; its reply comes on the receiver
    /// until the returned guard is dropped.
    pub(super) fn wait<'a>(&'a self, corr: &'a str) -> (Waiting<'a>, oneshot::Receiver<Body>) {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(corr.to_string(), tx);
        (
            Waiting {
                pending: self,
                corr,
            },
            rx,
        )
    }

    /// Where the reply to `corr` goes, if a call waits for it: taken, so
    /// a second reply to it finds nobody.
    pub(super) fn take(&self, corr: &str) -> Option<oneshot::Sender<Body>> {
        self.lock().remove(corr)
    }

    /// Hands `response` to the call waiting for `corr`; whether one was.
    #[cfg(test)]
    fn answer(&self, corr: &str, response: Body) -> bool {
        match self.take(corr) {
            Some(tx) => tx.send(response).is_ok(),
            None => false,
        }
    }

    /// Fails every call waiting: their replies can no longer come.
    pub(super) fn fail_all(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Body>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A call's registration, removed however the call ends.
pub(super) struct Waiting<'a> {
    pending: &'a Pending,
    corr: &'a str,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.pending.lock().remove(self.corr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_reaches_its_call_and_a_late_one_nobody() {
        let pending = Pending::default();
        let (waiting, mut rx) = pending.wait("a");
        assert!(pending.answer("a", b"1".to_vec()));
        assert_eq!(rx.try_recv().unwrap(), b"1");
        assert!(!pending.answer("a", b"2".to_vec()), "answered twice");
        drop(waiting);
        assert!(!pending.answer("b", b"3".to_vec()));
    }

    #[test]
    fn a_call_that_ends_is_forgotten_and_fail_all_fails_the_rest() {
        let pending = Pending::default();
        let (gone, _) = pending.wait("gone");
        drop(gone);
        assert!(!pending.answer("gone", b"1".to_vec()));
        let (_waiting, mut rx) = pending.wait("waiting");
        pending.fail_all();
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
    }
}
