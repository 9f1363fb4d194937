//! Calls waiting for their replies, by correlation id.
//!
//! A reply is handed over as its body, read by the call that waits for
//! it: a large one costs its own call the time to read it, not the task
//! that takes every reply of the proxy. A call registers before it publishes and is forgotten however it ends
//! (answered, timed out, dropped), so a late reply finds nobody and is
//! dropped. When the connection is lost, every call waiting is failed at
//! once rather than left to its timeout; when it was lost to a reply it
//! could not read, the calls waiting for replies to that connection's
//! reply queue are told apart (each call names the queue its request
//! named) and get their replies from it (`super::unreadable`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::replies::ReplyNames;

/// A reply's body, as it came.
pub(super) type Body = Vec<u8>;

/// Where a call's reply goes, and the reply names its request carried.
type Entry = (oneshot::Sender<Body>, Arc<ReplyNames>);

/// The calls waiting, each with where its reply goes.
#[derive(Default)]
pub(super) struct Pending(Mutex<HashMap<String, Entry>>);

impl Pending {
    /// Registers a call under `corr`, its request naming `names` to reply
    /// to; its reply comes on the receiver until the returned guard is
    /// dropped.
    pub(super) fn wait<'a>(
        &'a self,
        corr: &'a str,
        names: &Arc<ReplyNames>,
    ) -> (Waiting<'a>, oneshot::Receiver<Body>) {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(corr.to_string(), (tx, names.clone()));
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
        self.lock().remove(corr).map(|(tx, _)| tx)
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

    /// The correlation ids of the calls waiting now for replies to
    /// `queue`.
    pub(super) fn waiting_on(&self, queue: &str) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, (_, names))| names.queue == queue)
            .map(|(corr, _)| corr.clone())
            .collect()
    }

    /// Keeps in `calls` those still waiting for replies to `queue` (not
    /// ended, nor sent again under other names); whether any is.
    pub(super) fn still_waiting(&self, calls: &mut Vec<String>, queue: &str) -> bool {
        let map = self.lock();
        calls.retain(|corr| map.get(corr).is_some_and(|(_, names)| names.queue == queue));
        !calls.is_empty()
    }

    /// Fails those of `calls` still waiting for replies to `queue`: they
    /// can no longer come.
    pub(super) fn fail(&self, calls: &[String], queue: &str) {
        let mut map = self.lock();
        for corr in calls {
            if map.get(corr).is_some_and(|(_, names)| names.queue == queue) {
                map.remove(corr);
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
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

    fn names(uid: &str) -> Arc<ReplyNames> {
        Arc::new(ReplyNames::with_uid("u", uid))
    }

    #[test]
    fn a_reply_reaches_its_call_and_a_late_one_nobody() {
        let pending = Pending::default();
        let (waiting, mut rx) = pending.wait("a", &names("1"));
        assert!(pending.answer("a", b"1".to_vec()));
        assert_eq!(rx.try_recv().unwrap(), b"1");
        assert!(!pending.answer("a", b"2".to_vec()), "answered twice");
        drop(waiting);
        assert!(!pending.answer("b", b"3".to_vec()));
    }

    #[test]
    fn a_call_that_ends_is_forgotten_and_fail_all_fails_the_rest() {
        let pending = Pending::default();
        let (gone, _) = pending.wait("gone", &names("1"));
        drop(gone);
        assert!(!pending.answer("gone", b"1".to_vec()));
        let (_waiting, mut rx) = pending.wait("waiting", &names("1"));
        pending.fail_all();
        assert!(matches!(
            rx.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
    }

    /// The calls left waiting on a lost reply queue are told from those
    /// on another (made since, or sent again under new names), and only
    /// they are failed with it.
    #[test]
    fn calls_are_told_apart_by_the_reply_queue_they_named() {
        let pending = Pending::default();
        let (old, new) = (names("old"), names("new"));
        let (first, mut a) = pending.wait("a", &old);
        let (_b, mut b) = pending.wait("b", &new);
        let mut left = pending.waiting_on(&old.queue);
        assert_eq!(left, ["a"]);
        // "a" sent again under the new names: no longer the old queue's.
        drop(first);
        let (_again, mut a2) = pending.wait("a", &new);
        assert!(!pending.still_waiting(&mut left, &old.queue));
        pending.fail(&["a".to_string(), "b".to_string()], &old.queue);
        assert!(matches!(
            a.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        ));
        assert!(matches!(
            a2.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
        assert!(matches!(
            b.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ));
    }
}
