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
//! - when a reply could not be sent, the request is given back once
//!   (`basic.reject`, which every version counts).
//!
//! Quorum queues count such returns in `x-delivery-count` (RabbitMQ's
//! "Quorum Queues" guide, poison message handling: 3.x and 4.0 to 4.2
//! count every return, as the tests here see on 3.10; from 4.3 the guide's
//! "When is delivery count incremented?" counts only failed deliveries: a
//! `basic.reject`, and a delivery whose channel or connection went away,
//! but not a `basic.nack`, which is why the host gives back with
//! `basic.reject`). So a caller able to cost the host its connection a few
//! times (unreadable requests to ids not yet moved to a connection of
//! their own) could get another caller's request, in flight at the time,
//! refused as `Internal`.
//!
//! So the host notes each request it gave back while it lived, by server
//! id, `reply_to` and `correlation_id`, and does not count those
//! deliveries (up to [`MAX_TIMES`] a request). A request a consumer took
//! is held (in [`Taken`]) until it is settled: acked, or rejected; if
//! its channel is lost first, or its settling fails, it is noted, once. Another host, or this one
//! restarted, knows nothing of them and counts them all: a request that
//! kills every host it reaches is still stopped by the limit. That also
//! means the protection is a host's own: with several hosts of one id, a
//! request given back by one and taken by another is counted there.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::debug;

/// Requests noted at most; past half of it, the older half is let go.
const MAX_NOTED: usize = 1 << 16;

/// Returns of one request not counted at most: one that costs the host
/// its connection every time it is delivered, without killing it, is
/// still stopped by the limit, this many deliveries later.
const MAX_TIMES: u32 = 16;

/// How long a note is kept after the request was last given back, unless
/// half of [`MAX_NOTED`] newer ones push it out. A request given back
/// and not delivered here again within it (it expired, or went to
/// another host) is forgotten.
const KEPT_FOR: Duration = Duration::from_secs(60 * 60);

/// What identifies a request here: its server id, `reply_to` and
/// `correlation_id`, hashed with a key of this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct RequestKey(u64);

/// A request's returns, and when it was last given back.
#[derive(Debug, Clone, Copy)]
struct Noted {
    times: u32,
    at: Instant,
    /// Whether one of the returns was after a reply that could not be
    /// sent.
    reply_failed: bool,
}

impl Noted {
    fn live(self, now: Instant) -> Option<Self> {
        (now.saturating_duration_since(self.at) < KEPT_FOR).then_some(self)
    }
}

/// The notes, in two generations: new notes go into `current`; when it
/// holds half of [`MAX_NOTED`], it becomes `previous`, and the previous
/// one is let go. A note older than [`KEPT_FOR`] is not read; once the
/// newest is that old, all are let go. No note is swept one by one.
#[derive(Debug, Default)]
struct Notes {
    current: HashMap<RequestKey, Noted>,
    previous: HashMap<RequestKey, Noted>,
    /// When the last note was made.
    newest: Option<Instant>,
}

impl Notes {
    /// Lets every note go once the newest is too old to be read.
    fn age(&mut self, now: Instant) {
        if self
            .newest
            .is_some_and(|newest| now.saturating_duration_since(newest) >= KEPT_FOR)
        {
            *self = Notes::default();
        }
    }

    fn note(&mut self, key: RequestKey, now: Instant, reply_failed: bool) {
        let before = match self.current.get(&key) {
            Some(&noted) => Some(noted),
            None => self.previous.remove(&key),
        }
        .and_then(|n| n.live(now));
        let times = before.map_or(0, |n| n.times).saturating_add(1);
        let reply_failed = reply_failed || before.is_some_and(|n| n.reply_failed);
        if !self.current.contains_key(&key) && self.current.len() >= MAX_NOTED / 2 {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(
            key,
            Noted {
                times,
                at: now,
                reply_failed,
            },
        );
        self.newest = Some(now);
    }

    fn get(&self, key: RequestKey, now: Instant) -> Option<Noted> {
        self.current
            .get(&key)
            .or_else(|| self.previous.get(&key))
            .and_then(|n| n.live(now))
    }

    fn len(&self) -> usize {
        self.current.len() + self.previous.len()
    }
}

/// The requests this host gave back and how many times.
#[derive(Debug, Default)]
pub(super) struct GivenBack {
    keys: RandomState,
    notes: Mutex<Notes>,
    /// How many are noted: zero on a host that gave none back for
    /// [`KEPT_FOR`], which then takes no lock per request.
    len: AtomicUsize,
}

impl GivenBack {
    /// The key of a request of `id`.
    pub(super) fn key(&self, id: &str, reply_to: &str, correlation_id: &str) -> RequestKey {
        RequestKey(self.keys.hash_one((id, reply_to, correlation_id)))
    }

    /// Notes that each of `keys` was given back once more.
    pub(super) fn note(&self, keys: impl IntoIterator<Item = RequestKey>) {
        self.note_at(keys, Instant::now(), false);
    }

    fn note_at(
        &self,
        keys: impl IntoIterator<Item = RequestKey>,
        now: Instant,
        reply_failed: bool,
    ) {
        let mut keys = keys.into_iter().peekable();
        if keys.peek().is_none() {
            return;
        }
        let mut noted = 0;
        {
            let mut notes = self.lock();
            notes.age(now);
            for key in keys {
                notes.note(key, now, reply_failed);
                noted += 1;
            }
            self.len.store(notes.len(), Ordering::Relaxed);
        }
        debug!(target: "callme::server", requests = noted, "noted as given back: not counted against them when delivered again");
    }

    /// How many times this host gave the request back lately, up to
    /// [`MAX_TIMES`].
    pub(super) fn times(&self, key: RequestKey) -> u32 {
        self.times_at(key, Instant::now())
    }

    fn times_at(&self, key: RequestKey, now: Instant) -> u32 {
        if self.len.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        let mut notes = self.lock();
        notes.age(now);
        self.len.store(notes.len(), Ordering::Relaxed);
        notes.get(key, now).map_or(0, |n| n.times.min(MAX_TIMES))
    }

    /// Whether this host gave the request back lately after a reply that
    /// could not be sent.
    pub(super) fn reply_failed(&self, key: RequestKey) -> bool {
        if self.len.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let now = Instant::now();
        let mut notes = self.lock();
        notes.age(now);
        notes.get(key, now).is_some_and(|n| n.reply_failed)
    }

    /// Forgets a request: it was acked, or rejected for good.
    fn forget(&self, key: RequestKey) {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let mut notes = self.lock();
        notes.current.remove(&key);
        notes.previous.remove(&key);
        self.len.store(notes.len(), Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, Notes> {
        self.notes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The requests one consumer (on one channel) has taken and not yet
/// settled, by delivery tag: what goes back to the queue if the channel
/// is lost.
#[derive(Debug)]
pub(super) struct Taken {
    held: Mutex<HashMap<u64, RequestKey>>,
    given_back: Arc<GivenBack>,
    /// The consumer has ended: no more requests come to it.
    ended: AtomicBool,
}

impl Taken {
    pub(super) fn new(given_back: Arc<GivenBack>) -> Arc<Self> {
        Arc::new(Taken {
            held: Mutex::new(HashMap::new()),
            given_back,
            ended: AtomicBool::new(false),
        })
    }

    /// Its consumer has ended (cancelled, or its channel lost).
    pub(super) fn end(&self) {
        self.ended.store(true, Ordering::Release);
    }

    /// Whether nothing of its queue is left here, waiting up to `within`
    /// for a consumer just cancelled to end: no request will come, and
    /// every one taken is settled or went back with its channel. Only
    /// then may the queue be deleted: a request taken and not acked is not
    /// counted by the broker's `message_count` nor by `queue.delete`'s
    /// `if-empty` (both count ready messages only), so deleting the queue
    /// under it would leave it nowhere to go back to.
    pub(super) async fn let_go(&self, within: Duration) -> bool {
        let until = Instant::now() + within;
        loop {
            let ended = self.ended.load(Ordering::Acquire);
            // Read after `ended`: the loop holds a request before it ends.
            let held = !self.lock().is_empty();
            if ended || held || Instant::now() >= until {
                return ended && !held;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Holds a request until it is settled (see [`Holding`]).
    pub(super) fn hold(self: &Arc<Self>, tag: u64, key: RequestKey) -> Holding {
        self.lock().insert(tag, key);
        Holding {
            taken: self.clone(),
            tag,
            key,
            settled: false,
        }
    }

    /// The channel is lost: every request held went back to its queue.
    /// Returns how many.
    pub(super) fn lost(&self) -> usize {
        let keys: Vec<RequestKey> = self.lock().drain().map(|(_, key)| key).collect();
        let n = keys.len();
        self.given_back.note(keys);
        n
    }

    /// Lets go of the request `tag`; whether it was still held (not let go
    /// with the channel already).
    fn release(&self, tag: u64) -> bool {
        self.lock().remove(&tag).is_some()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, RequestKey>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A request held by its consumer's [`Taken`]. Dropped without being
/// settled (its ack or reject failed, or was never sent), it is noted as
/// given back: it goes back to its queue with its channel.
#[derive(Debug)]
pub(super) struct Holding {
    taken: Arc<Taken>,
    tag: u64,
    key: RequestKey,
    settled: bool,
}

impl Holding {
    pub(super) fn key(&self) -> RequestKey {
        self.key
    }

    /// It is about to be given back (`basic.reject` with requeue) after
    /// its reply could not be sent: noted now, before the broker can
    /// deliver it again, and only once whether the reject goes out or its
    /// channel is lost.
    pub(super) fn given_back(mut self) {
        if self.taken.release(self.tag) {
            self.taken
                .given_back
                .note_at([self.key], Instant::now(), true);
        }
        self.settled = true;
    }

    /// It was acked, or rejected without going back: nothing of it is
    /// noted any more.
    pub(super) fn settled(mut self) {
        if self.taken.release(self.tag) {
            self.taken.given_back.forget(self.key);
        }
        self.settled = true;
    }
}

impl Drop for Holding {
    fn drop(&mut self) {
        if !self.settled && self.taken.release(self.tag) {
            self.taken.given_back.note([self.key]);
        }
    }
}

#[cfg(test)]
mod tests {
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
        assert_eq!(given.len.load(Ordering::Relaxed), 0);
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
    fn notes_are_kept_for_their_time_from_the_last_return() {
        let given = GivenBack::default();
        let (early, late) = (
            given.key("calc", "r", "early"),
            given.key("calc", "r", "late"),
        );
        let then = Instant::now();
        given.note_at([early, late], then, false);
        given.note_at([late], then + KEPT_FOR / 2, false);
        let almost = then + KEPT_FOR - Duration::from_secs(1);
        assert_eq!(given.times_at(early, almost), 1);
        assert_eq!(given.times_at(late, almost), 2);
        // Its time is up: not read, and counted from nothing if given
        // back again.
        let full = then + KEPT_FOR;
        assert_eq!(given.times_at(early, full), 0);
        assert_eq!(given.times_at(late, full), 2);
        given.note_at([early], full, false);
        assert_eq!(given.times_at(early, full), 1);
        // Long after the newest, nothing is left, and no lock is taken.
        assert_eq!(given.times_at(late, full + KEPT_FOR), 0);
        assert_eq!(given.len.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_reply_that_failed_is_remembered_with_the_returns() {
        let given = GivenBack::default();
        let key = given.key("calc", "r", "c");
        let now = Instant::now();
        given.note_at([key], now, false);
        assert!(!given.reply_failed(key));
        given.note_at([key], now, true);
        // A later return for another reason keeps it.
        given.note_at([key], now, false);
        assert!(given.reply_failed(key));
        assert_eq!(given.times_at(key, now), 3);
        given.forget(key);
        assert!(!given.reply_failed(key));
    }

    #[test]
    fn the_notes_are_bounded_and_the_oldest_go_first() {
        let given = GivenBack::default();
        let key = |i: usize| given.key("calc", "r", &i.to_string());
        let now = Instant::now();
        given.note_at((0..MAX_NOTED).map(key), now, false);
        assert_eq!(given.len.load(Ordering::Relaxed), MAX_NOTED);
        assert_eq!(given.times_at(key(0), now), 1);
        // One more: the older half goes.
        given.note_at([key(MAX_NOTED)], now, false);
        assert_eq!(given.times_at(key(0), now), 0);
        assert_eq!(given.times_at(key(MAX_NOTED / 2 - 1), now), 0);
        assert_eq!(given.times_at(key(MAX_NOTED / 2), now), 1);
        assert_eq!(given.times_at(key(MAX_NOTED), now), 1);
        given.note_at((MAX_NOTED..3 * MAX_NOTED).map(key), now, false);
        assert!(given.len.load(Ordering::Relaxed) <= MAX_NOTED);
        assert_eq!(given.times_at(key(3 * MAX_NOTED - 1), now), 1);
    }

    #[test]
    fn a_held_request_is_noted_once_whichever_way_it_goes_back() {
        let given = Arc::new(GivenBack::default());
        let key = |c: &str| given.key("calc", "r", c);
        let taken = Taken::new(given.clone());
        // Acked: nothing noted, and what was noted before is forgotten.
        given.note([key("acked")]);
        taken.hold(1, key("acked")).settled();
        assert_eq!(given.times(key("acked")), 0);
        // Its settling failed: noted when dropped.
        drop(taken.hold(2, key("failed")));
        assert_eq!(given.times(key("failed")), 1);
        // The channel lost while it runs: noted then, and not again when
        // its ack fails after.
        let running = taken.hold(3, key("running"));
        assert_eq!(taken.lost(), 1);
        assert_eq!(given.times(key("running")), 1);
        drop(running);
        assert_eq!(given.times(key("running")), 1);
        // Given back on purpose: noted before, and once.
        let requeued = taken.hold(5, key("requeued"));
        requeued.given_back();
        assert_eq!(given.times(key("requeued")), 1);
        assert_eq!(taken.lost(), 0);
        // Nor forgotten if it is acked after all: its ack went nowhere.
        let late = taken.hold(4, key("late"));
        taken.lost();
        late.settled();
        assert_eq!(given.times(key("late")), 1);
        assert_eq!(taken.lost(), 0);
        // Nothing of the consumer's is kept once its requests are done.
        assert_eq!(Arc::strong_count(&taken), 1);
    }
}
