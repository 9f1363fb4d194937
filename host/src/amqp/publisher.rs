//! Publishing with confirms on a pool of channels, one publish per channel at a time.
//!
//! The broker answers a publish to an exchange that does not exist (or one
//! the user may not write to) by closing the channel it came on. On a
//! channel shared by many publishers that costs everyone: every publish
//! waiting for its confirm on it fails too, and frames other tasks had
//! already queued for it can reach the broker after the close, which the
//! broker punishes by closing the whole connection (`CHANNEL_ERROR -
//! expected 'channel.open'`).
//!
//! A [`Publisher`] gives each publish a channel of its own, a *lane*,
//! until its confirm has come back. A publish the broker refuses closes
//! only its own lane; the lane is replaced when next needed. Lanes are
//! kept and reused, so the common case costs nothing more than a shared
//! channel, and their number is bounded, so a flood of refused publishes
//! can neither touch another publish nor grow the connection's channel
//! count.
//!
//! One exchange holds at most a quarter of the lanes: a server whose queue
//! stops confirming (a quorum queue that lost its majority, RabbitMQ 3.8
//! to 4.x, withholds confirms until it has one again) keeps the lanes its
//! requests took until the broker confirms them, and without a bound its
//! callers would take every lane and stall the calls to every other
//! server. (Four such servers at once still take them all.)
//!
//! A publish whose caller stops waiting (a timeout, a dropped future)
//! keeps its lane until every frame of it was written, and no longer: its
//! channel is then closed (the broker takes the `close` after the
//! publish) and the lane freed at once, without waiting for a confirm a
//! queue may withhold for as long as it likes. Not before: dropping a lane
//! closes its channel, and lapin 4.12 sends a channel's `close` ahead of
//! publishes still queued for it (behind other large ones), so a request
//! given up before it was written would otherwise reach the broker after
//! its channel's close, and the broker would close the whole connection
//! (`CHANNEL_ERROR - expected 'channel.open'`), failing every other call
//! waiting on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::connect::{classify_lapin, is_not_found};
use crate::Error;

/// How long closing a nacked lane may take before it is left to go.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// How often a lane whose caller stopped waiting, and whose publish the
/// broker has not confirmed yet, is looked at: it is let go once its
/// channel is gone (with its connection, or closed by the broker).
const SETTLE_CHECK: Duration = Duration::from_secs(10);

/// What became of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Published {
    /// The broker took it.
    Confirmed,
    /// `mandatory` was set and no queue was bound to take it.
    Returned,
    /// The broker refused it for its size (over its `max_message_size`:
    /// 16 MiB by default in RabbitMQ 4.x, 128 MiB in 3.x), closing the
    /// lane; the message says so.
    TooLarge(String),
    /// The exchange does not exist (the broker closed the lane with 404).
    NoExchange,
    /// The broker refused it (a negative confirm).
    Nacked,
    /// Its caller stopped waiting before the broker confirmed it (or
    /// the time a reply may wait for its confirm ran out): its lane was
    /// closed behind it.
    Abandoned,
}

/// A lane held for one publish: its channel, its place among the
/// publisher's lanes and in its exchange's share. Dropped unused, its
/// channel is closed.
pub(crate) struct Held {
    channel: Channel,
    lane: Option<OwnedSemaphorePermit>,
    share: ExchangeLane,
}

/// A bounded pool of confirm-mode channels, each carrying one publish at a
/// time.
pub(crate) struct Publisher {
    idle: Mutex<Vec<Lane>>,
    lanes: Arc<Semaphore>,
    /// The lanes each exchange may hold at once, for the exchanges that
    /// hold one or wait for one now.
    per_exchange: Arc<Mutex<HashMap<String, Share>>>,
    /// How many lanes one exchange may hold.
    exchange_lanes: usize,
}

struct Lane {
    /// The connection the channel belongs to: lanes of an earlier
    /// connection are dropped, not reused.
    conn: Weak<Connection>,
    channel: Channel,
}

impl Publisher {
    /// A publisher with at most `lanes` channels open at once, a quarter
    /// of them at most for one exchange.
    pub(crate) fn new(lanes: usize) -> Publisher {
        let lanes = lanes.max(1);
        Publisher {
            idle: Mutex::new(Vec::new()),
            lanes: Arc::new(Semaphore::new(lanes)),
            per_exchange: Arc::default(),
            exchange_lanes: (lanes / 4).max(1),
        }
    }

    /// A lane's worth of `exchange`'s share, waited for.
    async fn exchange_lane(&self, exchange: &str) -> ExchangeLane {
        let share = {
            let mut shares = lock(&self.per_exchange);
            let entry = shares.entry(exchange.to_string()).or_insert_with(|| Share {
                lanes: Arc::new(Semaphore::new(self.exchange_lanes)),
                users: 0,
            });
            entry.users += 1;
            entry.lanes.clone()
        };
        // Counted as a user from here, whether it gets a lane or its
        // caller stops waiting.
        let mut lane = ExchangeLane {
            exchange: exchange.to_string(),
            permit: None,
            shares: self.per_exchange.clone(),
        };
        // The semaphore is never closed.
        lane.permit = share.acquire_owned().await.ok();
        lane
    }

    /// Publishes `body` to `exchange` with routing key `""` on `conn` and
    /// waits for the broker's confirm, or for `gone` (see
    /// [`Publisher::send`]). Waits for a free lane when all are busy.
    ///
    /// # Errors
    ///
    /// As [`Publisher::send`].
    #[cfg(feature = "server")]
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn publish(
        &self,
        conn: &Arc<Connection>,
        exchange: &str,
        options: BasicPublishOptions,
        body: &[u8],
        properties: BasicProperties,
        gone: impl Future<Output = ()>,
    ) -> Result<Published, Error> {
        let held = self.hold(conn, exchange).await?;
        self.send(conn, held, exchange, options, body, properties, gone)
            .await
    }

    /// A lane for a publish to `exchange` on `conn`, waited for while all
    /// are busy, or the exchange holds its share.
    ///
    /// # Errors
    ///
    /// [`Error::Connection`] (or [`Error::AccessRefused`]) when no channel
    /// could be opened.
    pub(crate) async fn hold(&self, conn: &Arc<Connection>, exchange: &str) -> Result<Held, Error> {
        // An exchange's share first: calls to a server that holds its
        // share wait without holding a lane others could use.
        let share = self.exchange_lane(exchange).await;
        // The semaphore is never closed.
        let lane = self.lanes.clone().acquire_owned().await.ok();
        let channel = match self.take(conn) {
            Some(channel) => channel,
            None => open(conn).await?,
        };
        Ok(Held {
            channel,
            lane,
            share,
        })
    }

    /// Gives `held`, a lane of `conn` that was not used after all, back
    /// to be reused.
    pub(crate) fn put_back(&self, conn: &Arc<Connection>, held: Held) {
        self.give_back(conn, held.channel);
    }

    /// Publishes `body` to `exchange` on `held`, a lane of `conn`, and
    /// waits for the broker's confirm, or for `gone` (its caller stopped
    /// waiting), which is first polled once every frame of the publish
    /// was written: then its lane is closed and freed without waiting
    /// for the confirm ([`Published::Abandoned`]).
    ///
    /// # Errors
    ///
    /// [`Error::AccessRefused`] when the user may not write to the
    /// exchange; [`Error::Connection`] when the connection or the lane
    /// failed for another reason (the publish may or may not have reached
    /// the broker).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn send(
        &self,
        conn: &Arc<Connection>,
        held: Held,
        exchange: &str,
        options: BasicPublishOptions,
        body: &[u8],
        properties: BasicProperties,
        gone: impl Future<Output = ()>,
    ) -> Result<Published, Error> {
        let Held {
            channel,
            lane,
            share,
        } = held;
        let mut sending = Sending {
            channel: Some(channel.clone()),
            written: false,
            lane,
            share: Some(share),
        };
        let sent = async {
            let confirm = channel
                .basic_publish(exchange.into(), "".into(), options, body, properties)
                .await?;
            // Every frame is written: from here the lane may be closed.
            sending.written = true;
            tokio::select! {
                confirmed = confirm => confirmed.map(Some),
                () = gone => Ok(None),
            }
        }
        .await;
        sending.settled();
        let sent = match sent {
            Ok(Some(confirmation)) => Ok(confirmation),
            Ok(None) => {
                close_lane(&channel, "abandoned").await;
                return Ok(Published::Abandoned);
            }
            Err(e) => Err(e),
        };
        match sent {
            Ok(confirmation) => Ok(match confirmation {
                Confirmation::Ack(None) | Confirmation::NotRequested => {
                    self.give_back(conn, channel);
                    Published::Confirmed
                }
                Confirmation::Ack(Some(_)) | Confirmation::Nack(Some(_)) => {
                    self.give_back(conn, channel);
                    Published::Returned
                }
                // A quorum queue whose leader was just lost nacks every
                // publish on a channel that published before the new
                // leader was known, until the old leader's node returns
                // (RabbitMQ 3.10 and 4.x). A new channel is spared that:
                // the nacked lane is closed, not reused.
                Confirmation::Nack(None) => {
                    close_lane(&channel, "nacked").await;
                    Published::Nacked
                }
            }),
            // The lane is closed by the broker; dropping it lets it go.
            // The exchange does not exist.
            Err(e) if is_not_found(&e) => Ok(Published::NoExchange),
            Err(e) if let Some(message) = too_large(&e) => Ok(Published::TooLarge(message)),
            Err(e) => Err(classify_lapin(e)),
        }
    }

    /// An idle lane on `conn`; lanes of other connections, or closed ones,
    /// are dropped on the way.
    fn take(&self, conn: &Arc<Connection>) -> Option<Channel> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(lane) = idle.pop() {
            if lane.conn.as_ptr() == Arc::as_ptr(conn) && lane.channel.status().connected() {
                return Some(lane.channel);
            }
        }
        None
    }

    fn give_back(&self, conn: &Arc<Connection>, channel: Channel) {
        if channel.status().connected() {
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Lane {
                    conn: Arc::downgrade(conn),
                    channel,
                });
        }
    }
}

/// A lane while its publish is under way. Dropped before [`Sending::settled`]
/// (its caller stopped waiting), it hands the lane to a task that closes
/// its channel once every frame of the publish was sent, and only then
/// lets the lane go.
struct Sending {
    channel: Option<Channel>,
    /// Every frame of the publish was written.
    written: bool,
    lane: Option<OwnedSemaphorePermit>,
    share: Option<ExchangeLane>,
}

impl Sending {
    /// The publish finished, confirmed or failed: the lane is the caller's
    /// to keep or drop.
    fn settled(&mut self) {
        self.channel = None;
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        let Some(channel) = self.channel.take() else {
            return;
        };
        let (lane, share) = (self.lane.take(), self.share.take());
        let written = self.written;
        // Outside a runtime (or in one shutting down, which drops the task
        // unrun) there is nobody to wait: the lane goes now. The proxy and
        // the server close their connections then anyway.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                // Not before the frames were written, however long that
                // takes (a connection the broker blocked for a memory
                // alarm sends nothing meanwhile); with no way to see
                // that, a publish given up while being written keeps its
                // lane until it is confirmed.
                if !written {
                    while tokio::time::timeout(SETTLE_CHECK, channel.wait_for_confirms())
                        .await
                        .is_err()
                        && channel.status().connected()
                    {}
                }
                close_lane(&channel, "abandoned").await;
                drop((lane, share));
            });
        }
    }
}

/// One exchange's share of the lanes.
struct Share {
    lanes: Arc<Semaphore>,
    /// Publishes holding one of them or waiting for one.
    users: usize,
}

/// A lane of an exchange's share, held while its publish is under way
/// (or waited for). The last user takes the exchange's entry away.
struct ExchangeLane {
    exchange: String,
    permit: Option<OwnedSemaphorePermit>,
    shares: Arc<Mutex<HashMap<String, Share>>>,
}

impl Drop for ExchangeLane {
    fn drop(&mut self) {
        let mut shares = lock(&self.shares);
        drop(self.permit.take());
        if let Some(share) = shares.get_mut(&self.exchange) {
            share.users -= 1;
            if share.users == 0 {
                shares.remove(&self.exchange);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Closes a lane's channel, waiting at most [`CLOSE_WITHIN`] for the
/// broker's answer: a lane closed is free to be opened again.
async fn close_lane(channel: &Channel, why: &str) {
    let _ = tokio::time::timeout(CLOSE_WITHIN, channel.close(200, why.into())).await;
}

/// A new channel in confirm mode.
async fn open(conn: &Connection) -> Result<Channel, Error> {
    let channel = conn.create_channel().await.map_err(classify_lapin)?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(classify_lapin)?;
    Ok(channel)
}

/// The broker's message when it refused a publish for its size: a
/// channel error `406 PRECONDITION_FAILED - message size N is larger than
/// configured max size M` (RabbitMQ 3.8 to 4.x, `rabbit_channel`).
fn too_large(e: &lapin::Error) -> Option<String> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            ) && amqp.get_message().as_str().contains("max size") =>
        {
            Some(amqp.get_message().to_string())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchanges(p: &Publisher) -> usize {
        lock(&p.per_exchange).len()
    }

    #[tokio::test]
    async fn one_exchange_holds_a_quarter_of_the_lanes_and_leaves_no_entry() {
        let p = Publisher::new(8);
        let a1 = p.exchange_lane("a").await;
        let a2 = p.exchange_lane("a").await;
        // The third waits for one of the first two; another exchange not.
        let third = tokio::time::timeout(Duration::from_millis(50), p.exchange_lane("a")).await;
        assert!(third.is_err(), "a third lane for one exchange of 8 lanes");
        let b = p.exchange_lane("b").await;
        assert_eq!(exchanges(&p), 2);
        // A caller that stops waiting leaves nothing behind either.
        let waiting = p.exchange_lane("a");
        let _ = tokio::time::timeout(Duration::from_millis(10), waiting).await;
        drop(a1);
        let a3 = p.exchange_lane("a").await;
        drop((a2, a3, b));
        assert_eq!(exchanges(&p), 0);
    }
}
