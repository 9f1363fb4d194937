//! Requests this host gave back to the broker and lived through: the delivery limit does not hold those deliveries against them.
//!
//! The delivery limit ([`super::ServerOptions::delivery_limit`]) refuses
//! a request the broker says it delivered that many times before without
//! an answer: most likely it killed a host each time. But a host also
//! gives requests back without dying:
//!
//! - when it loses a connection or a channel, every request in flight on
//!   it goes back to its queue;
//! - when it looks for a request the AMQP client cannot read
//!   ([`super::unreadable`]), the requests it looks at go back;
//! - when a reply could not be sent, the request is given back once.
//!
//! Quorum queues count such returns in `x-delivery-count` (RabbitMQ's
//! "Quorum Queues" guide, poison message handling: 3.x counts every
//! return, as the tests here see on 3.10; 4.3 narrowed the count to
//! returns that say a delivery failed, a closed channel or connection
//! among them). So a caller able to cost the host its connection a few
//! times (unreadable requests to ids not yet moved to a connection of
//! their own) could get another caller's request, in flight at the time,
//! refused as `Internal`.
//!
//! So the host notes each request it gave back while it lived, by server
//! id, `reply_to` and `correlation_id`, and does not count those
//! deliveries (up to [`MAX_TIMES`] a request). Another host, or this one
//! restarted, knows nothing of them and counts them all: a request that
//! kills every host it reaches is still stopped by the limit. That also
//! means the protection is a host's own: with several hosts of one id, a
//! request given back by one and taken by another is counted there.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Requests noted at most: past it, no more are noted until some are
/// forgotten or expire (those are then counted, as without notes).
const MAX_NOTED: usize = 1 << 16;

/// Returns of one request not counted at most: one that costs the host
/// its connection every time it is delivered, without killing it, is
/// still stopped by the limit, this many deliveries later.
const MAX_TIMES: u32 = 16;

/// How long a note is kept: a request given back and not delivered again
/// within it (it expired, or went to another host) is forgotten.
const KEPT_FOR: Duration = Duration::from_secs(60 * 60);

/// What identifies a request here: its server id, `reply_to` and
/// `correlation_id`, hashed with a key of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct RequestKey(u64);

#[derive(Debug)]
struct Noted {
    times: u32,
    at: Instant,
}

/// The requests this host gave back and how many times.
#[derive(Debug, Default)]
pub(super) struct GivenBack {
    keys: RandomState,
    noted: Mutex<HashMap<RequestKey, Noted>>,
    /// How many are noted: zero on a host that never gave one back, which
    /// then takes no lock per request.
    len: AtomicUsize,
}

impl GivenBack {
    /// The key of a request of `id`.
    pub(super) fn key(&self, id: &str, reply_to: &str, correlation_id: &str) -> RequestKey {
        RequestKey(self.keys.hash_one((id, reply_to, correlation_id)))
    }

    /// Notes that each of `keys` was given back once more.
    pub(super) fn note(&self, keys: impl IntoIterator<Item = RequestKey>) {
        self.note_at(keys, Instant::now());
    }

    fn note_at(&self, keys: impl IntoIterator<Item = RequestKey>, now: Instant) {
        let mut noted = self.lock();
        let mut swept = false;
        for key in keys {
            if let Some(entry) = noted.get_mut(&key) {
                entry.times = entry.times.saturating_add(1);
                entry.at = now;
                continue;
            }
            if noted.len() >= MAX_NOTED && !swept {
                noted.retain(|_, n| now.saturating_duration_since(n.at) < KEPT_FOR);
                swept = true;
            }
            if noted.len() >= MAX_NOTED {
                continue;
            }
            noted.insert(key, Noted { times: 1, at: now });
        }
        self.len.store(noted.len(), Ordering::Relaxed);
    }

    /// How many times this host gave the request back (within
    /// [`KEPT_FOR`]), up to [`MAX_TIMES`].
    pub(super) fn times(&self, key: RequestKey) -> u32 {
        self.times_at(key, Instant::now())
    }

    fn times_at(&self, key: RequestKey, now: Instant) -> u32 {
        if self.len.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.lock()
            .get(&key)
            .filter(|n| now.saturating_duration_since(n.at) < KEPT_FOR)
            .map_or(0, |n| n.times.min(MAX_TIMES))
    }

    /// Forgets a request: it was answered (or dropped) and acked.
    pub(super) fn forget(&self, key: RequestKey) {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut noted = self.lock();
        if noted.remove(&key).is_some() {
            self.len.store(noted.len(), Ordering::Relaxed);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RequestKey, Noted>> {
        self.noted.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The requests one consumer (on one channel) has taken and not yet
/// settled, by delivery tag: what goes back to the queue if the channel
/// is lost.
#[derive(Debug, Default)]
pub(super) struct Taken {
    held: Mutex<HashMap<u64, RequestKey>>,
}

impl Taken {
    /// Holds a request until the returned guard is dropped.
    pub(super) fn hold(self: &std::sync::Arc<Self>, tag: u64, key: RequestKey) -> Holding {
        self.lock().insert(tag, key);
        Holding {
            taken: self.clone(),
            tag,
            key,
        }
    }

    /// The keys of the requests held now.
    pub(super) fn held(&self) -> Vec<RequestKey> {
        self.lock().values().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, RequestKey>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A request held by its consumer's [`Taken`] until dropped.
#[derive(Debug)]
pub(super) struct Holding {
    taken: std::sync::Arc<Taken>,
    tag: u64,
    key: RequestKey,
}

impl Holding {
    pub(super) fn key(&self) -> RequestKey {
        self.key
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        self.taken.lock().remove(&self.tag);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_request_never_given_back_counts_nothing() {
        let given = GivenBack::default();
        let key = given.key("calc", "client_x_ex_1", "c1");
        assert_eq!(given.times(key), 0);
        given.note([given.key("calc", "client_x_ex_1", "c2")]);
        assert_eq!(given.times(key), 0);
    }

    #[test]
    fn each_return_is_counted_until_forgotten() {
        let given = GivenBack::default();
        let key = given.key("calc", "client_x_ex_1", "c1");
        given.note([key]);
        given.note([key]);
        assert_eq!(given.times(key), 2);
        // The same reply address and correlation id to another id is
        // another request.
        assert_eq!(given.times(given.key("other", "client_x_ex_1", "c1")), 0);
        given.forget(key);
        assert_eq!(given.times(key), 0);
    }

    #[test]
    fn a_request_given_back_without_end_is_counted_past_a_bound() {
        let given = GivenBack::default();
        let key = given.key("calc", "r", "c");
        for _ in 0..100 {
            given.note([key]);
        }
        assert_eq!(given.times(key), MAX_TIMES);
    }

    #[test]
    fn notes_expire() {
        let given = GivenBack::default();
        let key = given.key("calc", "r", "c");
        let then = Instant::now();
        given.note_at([key], then);
        assert_eq!(given.times_at(key, then + KEPT_FOR / 2), 1);
        assert_eq!(given.times_at(key, then + KEPT_FOR), 0);
    }

    #[test]
    fn the_notes_are_bounded_and_make_room_from_expired_ones() {
        let given = GivenBack::default();
        let then = Instant::now();
        let keys = |from: usize, n: usize| {
            (from..from + n)
                .map(|i| given.key("calc", "r", &i.to_string()))
                .collect::<Vec<_>>()
        };
        given.note_at(keys(0, MAX_NOTED), then);
        let past = given.key("calc", "r", "past the bound");
        given.note_at([past], then);
        assert_eq!(given.times_at(past, then), 0, "noted past the bound");
        // Once the first ones expire, there is room again.
        let later = then + KEPT_FOR;
        given.note_at([past], later);
        assert_eq!(given.times_at(past, later), 1);
        assert_eq!(given.len.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_consumer_holds_what_it_took_until_it_is_settled() {
        let given = GivenBack::default();
        let taken = Arc::new(Taken::default());
        let (a, b) = (given.key("calc", "r", "a"), given.key("calc", "r", "b"));
        let first = taken.hold(1, a);
        let second = taken.hold(2, b);
        assert_eq!(first.key(), a);
        drop(first);
        assert_eq!(taken.held(), vec![b]);
        drop(second);
        assert!(taken.held().is_empty());
    }
}
