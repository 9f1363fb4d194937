//! The proxy's reply queue and its consumer, across reconnections.
//!
//! When the connection is lost, the calls waiting for replies are failed
//! at once, and on the next connection a reply exchange and queue are
//! declared under new names (the old queue deleted) and the proxy is
//! ready again: a broker that restarted, or a node that went down, may
//! have lost the replies on their way. Any server the proxy calls learns
//! the names, and anyone who may write to them can end the connection
//! with one message lapin cannot read (a header over the frame size, a
//! correlation id that is not UTF-8): named anew, they are not there to be
//! written to again the moment the proxy is back, and a server must be
//! called again to learn them.
//!
//! A connection lost to such a message fails no call waiting: the queue
//! outlives its connection, and the replies that reach it are handed to
//! those calls from a connection of its own (see [`super::unreadable`]).
//!
//! Replies are acknowledged, at most [`REPLY_PREFETCH`] at a time on
//! their way to the proxy, so whoever may publish to the reply queue (a
//! server, rightly or not) cannot make the proxy hold more than that many
//! messages: the rest waits in the broker, under its own limits. A reply
//! nobody waits for is dropped before its body is read.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::pending::Pending;
use crate::amqp::ConnectOptions;
use crate::amqp::connect::classify_lapin;
use crate::amqp::resubscribe::Subscription;
use crate::amqp::topology;
use crate::amqp::unreadable::is_unreadable;
use crate::protocol::{Response, client_exchange, client_queue};
use crate::{Error, ErrorKind, RemoteError};

/// Replies the broker sends the proxy before it acknowledges any: with
/// the broker's message size limit (16 MiB by default on RabbitMQ 4.x),
/// what a flood of replies can make a proxy hold.
pub(super) const REPLY_PREFETCH: u16 = 64;

/// How long the broker keeps a reply queue nobody uses (no consumer): long
/// enough for the proxy to connect again after a loss, short enough that
/// the queue of a proxy that went away without closing does not linger.
pub(crate) const REPLY_QUEUE_EXPIRES: std::time::Duration = std::time::Duration::from_secs(30);

/// How long deleting a reply queue may hold up what waits for it (the
/// proxy's close, a new connection's readiness): it is best effort, as the
/// broker deletes the queue anyway once unused.
pub(super) const DELETE_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Replies taken before they are acknowledged together.
const ACK_EVERY: u32 = 16;

/// How long replies taken wait for more before they are acknowledged.
const ACK_IDLE: std::time::Duration = std::time::Duration::from_millis(50);

/// The proxy's reply exchange and queue.
#[derive(Clone)]
pub(super) struct ReplyNames {
    pub(super) exchange: String,
    pub(super) queue: String,
    consumer_tag: String,
}

impl ReplyNames {
    /// New names for a proxy of broker user `user`.
    pub(super) fn new(user: &str) -> ReplyNames {
        ReplyNames::with_uid(user, &uuid::Uuid::new_v4().to_string())
    }

    /// The names of a proxy of broker user `user`, unique by `uid`.
    pub(super) fn with_uid(user: &str, uid: &str) -> ReplyNames {
        ReplyNames {
            exchange: client_exchange(user, uid),
            queue: client_queue(user, uid),
            consumer_tag: format!("callme-proxy-{uid}"),
        }
    }

    /// Declares the reply exchange and queue on a new channel of `conn`,
    /// binds them and starts consuming.
    pub(super) async fn declare(&self, conn: &Connection) -> Result<(Channel, Consumer), Error> {
        topology::declare_on(conn, async |channel| self.declare_on(channel).await).await
    }

    async fn declare_on(&self, channel: &Channel) -> Result<Consumer, Error> {
        topology::declare_reply(channel, &self.exchange, &self.queue, REPLY_QUEUE_EXPIRES)
            .await
            .map_err(classify_lapin)?;
        channel
            .basic_qos(REPLY_PREFETCH, BasicQosOptions::default())
            .await
            .map_err(classify_lapin)?;
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                self.consumer_tag.as_str().into(),
                BasicConsumeOptions {
                    exclusive: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(classify_lapin)?;
        Ok(consumer)
    }
}

/// The connection the reply queue is consumed on, while there is one;
/// the names of the reply exchange and queue (declared on it, or on the
/// last one); and, while the broker refuses to let them be declared again
/// (a permission taken away), why: calls fail with it at once rather than
/// wait out their timeouts for a reply queue that cannot be.
pub(super) type Ready = (Option<Arc<Connection>>, Arc<ReplyNames>, Option<String>);

/// The reply consumer: hands each reply to the call waiting for it, and
/// tells the proxy on which connection it can publish, and what replies
/// to it are addressed to.
pub(super) struct Replies {
    /// The broker user the names carry.
    pub(super) user: String,
    pub(super) names: Arc<ReplyNames>,
    /// Whether `names` served a connection: then the next one gets new
    /// ones. A declare that failed part-way (an exchange made, its queue
    /// refused) is tried again under the same names, leaving no exchange
    /// behind that nothing would ever bind and delete.
    pub(super) served: bool,
    pub(super) pending: Arc<Pending>,
    /// Closed when the proxy is dropped.
    pub(super) ready: watch::Sender<Ready>,
    /// How the proxy's link connects: for the connection of its own the
    /// replies left in a queue are taken on ([`super::unreadable`]).
    pub(super) connect: ConnectOptions,
    /// Whether the queue the last connection left is in the hands of
    /// [`super::unreadable::drain`], which deletes it when done.
    pub(super) draining: bool,
    /// Turns at draining a queue ([`super::unreadable::MAX_DRAINS`]).
    pub(super) drains: Arc<tokio::sync::Semaphore>,
}

impl Subscription for Replies {
    fn what(&self) -> String {
        format!("reply queue of {}", self.names.exchange)
    }

    async fn subscribe(&mut self, conn: &Connection) -> Result<Option<(Channel, Consumer)>, Error> {
        let drained = std::mem::take(&mut self.draining);
        let old = (self.served && !drained).then(|| self.names.queue.clone());
        if self.served {
            self.names = Arc::new(ReplyNames::new(&self.user));
            self.served = false;
        }
        match self.names.declare(conn).await {
            Ok(declared) => {
                // The replies in the old queue were for calls failed with
                // its connection.
                // In the background: the proxy is ready meanwhile.
                if let Some(old) = old
                    && let Ok(Ok(channel)) =
                        tokio::time::timeout(DELETE_WITHIN, conn.create_channel()).await
                {
                    tokio::spawn(async move { topology::delete_reply_on(channel, &old).await });
                }
                Ok(Some(declared))
            }
            Err(Error::AccessRefused(why)) => {
                self.ready.send_modify(|ready| ready.2 = Some(why.clone()));
                Err(Error::AccessRefused(why))
            }
            // Refused no longer, but down: calls wait for the connection.
            Err(e) => {
                self.ready.send_modify(|ready| ready.2 = None);
                Err(e)
            }
        }
    }

    async fn consume(&mut self, conn: &Arc<Connection>, channel: &Channel, consumer: Consumer) {
        self.served = true;
        self.ready
            .send_replace((Some(conn.clone()), self.names.clone(), None));
        let ended = self.take_replies(channel, consumer).await;
        self.ready.send_replace((None, self.names.clone(), None));
        if ended.as_ref().is_some_and(is_unreadable) && !self.ready.is_closed() {
            // The replies on their way wait in the queue, which outlived
            // the connection: the calls waiting get them from there.
            let waiting = self.pending.waiting_on(&self.names.queue);
            if waiting.is_empty() {
                warn!(target: "callme::proxy", reply_queue = %self.names.queue, "a reply the AMQP client cannot read (a short string that is not UTF-8, or a header over the frame size) ended the proxy's connection; no call was waiting");
                return;
            }
            match self.drains.clone().try_acquire_owned() {
                Ok(turn) => {
                    warn!(target: "callme::proxy", reply_queue = %self.names.queue, calls = waiting.len(), "a reply the AMQP client cannot read (a short string that is not UTF-8, or a header over the frame size) ended the proxy's connection: the calls waiting get their replies from its reply queue, on a connection of its own");
                    tokio::spawn(super::unreadable::drain(
                        self.connect.clone(),
                        self.names.queue.clone(),
                        self.pending.clone(),
                        waiting,
                        turn,
                    ));
                    self.draining = true;
                }
                Err(_) => {
                    // Only this queue's calls: those of the queues being
                    // drained still get their replies.
                    warn!(target: "callme::proxy", reply_queue = %self.names.queue, calls = waiting.len(), "a reply the AMQP client cannot read ended the proxy's connection, and replies are taken from as many queues left behind as may be: the calls waiting fail");
                    self.pending.fail(&waiting, &self.names.queue);
                }
            }
            return;
        }
        // Replies to calls sent on that connection may be lost with it (a
        // broker restarted, a node down): fail those calls now rather than
        // let them wait out their timeouts. Only those: calls waiting on a
        // queue left behind by an unreadable reply get their replies from
        // it, on a connection of their own, and fail with that.
        let waiting = self.pending.waiting_on(&self.names.queue);
        self.pending.fail(&waiting, &self.names.queue);
    }

    fn wanted(&self) -> bool {
        !self.ready.is_closed()
    }

    async fn gone(&self) {
        self.ready.closed().await;
    }

    fn closed(&mut self) {
        // Closed for good: calls get `BrokerLost`, not a refusal of before,
        // and those still waiting (kept across a loss to an unreadable
        // reply) fail now.
        self.ready.send_modify(|ready| ready.2 = None);
        self.pending.fail_all();
    }
}

impl Replies {
    /// Takes replies until the consumer ends, acknowledging them in runs:
    /// every [`ACK_EVERY`], and what is left once none came for
    /// [`ACK_IDLE`]. Returns the error it ended with, if any.
    ///
    /// The acks are written by a task of their own ([`ack_runs`]): lapin
    /// ends an ack's future only once its bytes are written, after the
    /// rest of a publish it has begun, so an ack awaited here would hold
    /// every reply behind one caller's large request on a slow link.
    async fn take_replies(
        &self,
        channel: &Channel,
        mut consumer: Consumer,
    ) -> Option<lapin::Error> {
        let (acks, to_ack) = watch::channel(0);
        tokio::spawn(ack_runs(channel.clone(), to_ack));
        let mut unacked = None;
        let mut taken = 0;
        loop {
            let next = match unacked {
                None => consumer.next().await,
                Some(tag) => tokio::select! {
                    next = consumer.next() => next,
                    () = tokio::time::sleep(ACK_IDLE) => {
                        acks.send_replace(tag);
                        unacked = None;
                        taken = 0;
                        continue;
                    }
                },
            };
            let delivery = match next {
                Some(Ok(d)) => d,
                Some(Err(e)) => {
                    // A proxy being dropped closes its connection under
                    // the consumer: that is no loss worth a warning.
                    if self.ready.is_closed() {
                        debug!(target: "callme::proxy", error = %e, "reply consumer closed with the proxy");
                    } else {
                        warn!(target: "callme::proxy", error = %e, "reply consumer lost");
                    }
                    return Some(e);
                }
                None => return None,
            };
            let tag = delivery.delivery_tag;
            take(&self.pending, delivery);
            taken += 1;
            if taken < ACK_EVERY {
                unacked = Some(tag);
            } else {
                acks.send_replace(tag);
                unacked = None;
                taken = 0;
            }
        }
    }
}

/// Acknowledges, on `channel`, every reply up to each tag `tags` is given,
/// one ack at a time and in order: a tag given while an ack is written
/// is taken into the next (acks are `multiple`), so a later tag is never
/// acknowledged before an earlier one (the broker would close the
/// channel for an unknown tag). Ends with the channel, or once the
/// consumer is done with it.
async fn ack_runs(channel: Channel, mut tags: watch::Receiver<u64>) {
    while tags.changed().await.is_ok() {
        let tag = *tags.borrow_and_update();
        let acked = channel
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await;
        if let Err(e) = acked {
            // The channel is gone, and the consumer with it.
            debug!(target: "callme::proxy", error = %e, "replies not acknowledged");
            return;
        }
    }
}

/// Hands one reply's body to the call in `pending` waiting for it, which
/// reads it (see [`read`]).
pub(super) fn take(pending: &Pending, delivery: Delivery) {
    let Some(corr) = delivery.properties.correlation_id().as_ref() else {
        debug!(target: "callme::proxy", "reply without correlation id dropped");
        return;
    };
    let Some(call) = pending.take(corr.as_str()) else {
        debug!(target: "callme::proxy", correlation_id = %corr.as_str().escape_debug(), "late or unknown reply dropped");
        return;
    };
    // The call may have ended since: then nobody reads it.
    let _ = call.send(delivery.data);
}

/// A reply's body read as a response, of at most `limit` bytes (see
/// [`Response::decode_within`]); one that is none, or over the limit
/// (named by `whose`), an `Internal` error saying so.
pub(super) fn read(body: &[u8], limit: usize, whose: &str) -> Response {
    Response::decode_within(body, limit).unwrap_or_else(|e| {
        Response::Error(RemoteError::new(
            ErrorKind::Internal,
            format!("reply not taken: {e} ({whose})"),
        ))
    })
}
