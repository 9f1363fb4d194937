//! Replies: published with confirms on the server's [`Publisher`], and what became of them.
//!
//! A reply goes to the exchange the request named in `reply_to`. That
//! exchange is gone when the caller has left (a proxy closed, or gone for
//! 30 s, takes its auto-delete exchange with it), or never existed when
//! the caller lied. Either way only that reply is lost: the publisher's
//! lanes keep one refused publish from touching any other. What the
//! server does with the request then depends on the [`Sent`] outcome:
//! acked once the reply is confirmed or found undeliverable, given back to
//! the broker when it could not be sent for a reason that may pass, or
//! was not confirmed within the server's `reply_confirm_limit`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use tokio::sync::watch;

use crate::amqp::link;
use crate::amqp::pipeline::{Piped, Pipeline};
use crate::amqp::publisher::{Published, Publisher};
use crate::observe::ReplyLost;
use crate::protocol::{CONTENT_TYPE, ErrorKind, RemoteError, Response};
use crate::{Error, TraceContext};

/// Attempts at publishing one reply when its lane or the connection fails
/// under it.
const ATTEMPTS: usize = 3;

/// What became of a reply.
#[derive(Debug)]
pub(super) enum Sent {
    /// The broker confirmed it; `pipelined` when by the default exchange
    /// (where a reply to a caller that left is dropped, and confirmed).
    Delivered { pipelined: bool },
    /// It can never be delivered: the caller's exchange does not exist, or
    /// this server may not write to it.
    Undeliverable(ReplyLost),
    /// It could not be sent now (the connection is down, or the broker
    /// refused it); a later attempt may succeed.
    Failed(Error),
}

/// Publishes replies on the link's current connection.
#[derive(Clone)]
pub(super) struct Replier {
    link: watch::Receiver<link::State>,
    publisher: Arc<Publisher>,
    pipeline: Arc<Pipeline>,
    /// How long a written reply waits for its confirm.
    confirm_limit: Duration,
}

impl Replier {
    pub(super) fn new(
        link: watch::Receiver<link::State>,
        publisher: Arc<Publisher>,
        pipeline: Arc<Pipeline>,
        confirm_limit: Duration,
    ) -> Replier {
        Replier {
            link,
            publisher,
            pipeline,
            confirm_limit,
        }
    }

    /// Publishes `body` as the reply to `corr` on `exchange`, its
    /// `traceparent` the server's span of the call, `trace`. With `queue`
    /// (the caller's reply queue, see `protocol::REPLY_QUEUE`), the reply
    /// is pipelined to it by the default exchange first, and sent by
    /// `exchange` only if that did not plainly succeed.
    pub(super) async fn send(
        &self,
        exchange: &str,
        queue: Option<&str>,
        corr: &str,
        body: &[u8],
        trace: &TraceContext,
    ) -> Sent {
        let props = BasicProperties::default()
            .with_content_type(CONTENT_TYPE.into())
            .with_correlation_id(corr.into())
            .with_headers(trace.headers());
        if let Some(queue) = queue
            && self.pipeline.publish(queue, body, props.clone()).await == Piped::Confirmed
        {
            return Sent::Delivered { pipelined: true };
        }
        let mut last = None;
        // An error reply sent in place of one too large for the broker.
        let mut replacement: Option<Vec<u8>> = None;
        let confirm_limit = self.confirm_limit;
        for _ in 0..ATTEMPTS {
            let body = replacement.as_deref().unwrap_or(body);
            let conn = match &*self.link.borrow() {
                link::State::Up(conn) => conn.clone(),
                link::State::Down | link::State::Closed => break,
            };
            let published = self
                .publisher
                .publish(
                    &conn,
                    exchange,
                    BasicPublishOptions::default(),
                    body,
                    props.clone(),
                    // Lazy, so timed from its first poll, once the reply
                    // is written: the wait for a lane does not count.
                    async move { tokio::time::sleep(confirm_limit).await },
                )
                .await;
            match published {
                Ok(Published::Confirmed | Published::Returned) => {
                    return Sent::Delivered { pipelined: false };
                }
                Ok(Published::NoExchange) => {
                    return Sent::Undeliverable(ReplyLost::CallerGone);
                }
                // Too large for the broker: the caller gets a small
                // error reply in its place, typed as a result over its
                // cap is, rather than no reply (the request run again,
                // then dropped).
                Ok(Published::TooLarge(refusal)) if replacement.is_none() => {
                    let error = RemoteError::new(
                        ErrorKind::MemoryLimit,
                        format!(
                            "the reply of {} bytes is over the broker's maximum message size ({})",
                            body.len(),
                            refusal.escape_debug()
                        ),
                    );
                    replacement = Some(Response::from(Err(error)).encode());
                }
                Ok(Published::TooLarge(refusal)) => {
                    last = Some(Error::Disconnected(format!(
                        "the broker refused the reply: {refusal}"
                    )));
                }
                Ok(Published::Nacked) => {
                    last = Some(Error::Disconnected(
                        "the broker refused the reply (negative confirm)".into(),
                    ));
                }
                // Written, and not confirmed in time: not sent again
                // here, where it would wait as long again.
                Ok(Published::Abandoned) => {
                    return Sent::Failed(Error::Disconnected(format!(
                        "the broker did not confirm the reply within {:?}",
                        self.confirm_limit
                    )));
                }
                Err(Error::AccessRefused(_)) => {
                    return Sent::Undeliverable(ReplyLost::AccessRefused);
                }
                Err(e) => last = Some(e),
            }
        }
        Sent::Failed(last.unwrap_or_else(|| {
            Error::Disconnected("the broker connection is down: the reply cannot be sent".into())
        }))
    }
}

/// A warning that may repeat at any rate (one per bad request, say) but is
/// logged at most once per period, with how many were held back since.
pub(super) struct Throttle {
    period: Duration,
    last: Mutex<Option<Instant>>,
    held: AtomicU64,
}

impl Throttle {
    pub(super) const fn new(period: Duration) -> Throttle {
        Throttle {
            period,
            last: Mutex::new(None),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(held back since the last one)` when this occurrence should be
    /// logged, `None` when it is held back.
    pub(super) fn admit(&self) -> Option<u64> {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        match *last {
            Some(at) if now.duration_since(at) < self.period => {
                self.held.fetch_add(1, Ordering::Relaxed);
                None
            }
            _ => {
                *last = Some(now);
                Some(self.held.swap(0, Ordering::Relaxed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_logs_once_a_period_and_counts_the_rest() {
        let t = Throttle::new(Duration::from_millis(200));
        assert_eq!(t.admit(), Some(0));
        for _ in 0..1000 {
            assert_eq!(t.admit(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(t.admit(), Some(1000));
        assert_eq!(t.admit(), None);
    }
}
