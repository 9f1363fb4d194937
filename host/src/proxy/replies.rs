//! The proxy's reply queue and its consumer, across reconnections.
//!
//! The queue is exclusive to the connection: when the connection is
//! lost, so are the replies on their way, and the calls waiting for them
//! are failed at once. On each new connection a reply exchange and queue
//! are declared under new names and the proxy is ready again. Any server
//! the proxy calls learns the names, and anyone who may write to them can
//! end the connection with one message lapin cannot read (a header over
//! the frame size, a correlation id that is not UTF-8): named anew, they
//! are not there to be written to again the moment the proxy is back, and
//! a server must be called again to learn them.
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
use crate::amqp::connect::classify_lapin;
use crate::amqp::resubscribe::Subscription;
use crate::amqp::topology;
use crate::protocol::{Response, client_exchange, client_queue};
use crate::{Error, ErrorKind, RemoteError};

/// Replies the broker sends the proxy before it acknowledges any: with
/// the broker's message size limit (16 MiB by default on RabbitMQ 4.x),
/// what a flood of replies can make a proxy hold.
pub(super) const REPLY_PREFETCH: u16 = 64;

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
        topology::declare_reply(channel, &self.exchange, &self.queue)
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
}

impl Subscription for Replies {
    fn what(&self) -> String {
        format!("reply queue of {}", self.names.exchange)
    }

    async fn subscribe(&mut self, conn: &Connection) -> Result<Option<(Channel, Consumer)>, Error> {
        if self.served {
            self.names = Arc::new(ReplyNames::new(&self.user));
            self.served = false;
        }
        match self.names.declare(conn).await {
            Ok(declared) => Ok(Some(declared)),
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
        self.take_replies(channel, consumer).await;
        // Replies to calls sent on that connection went with it (the reply
        // queue is exclusive to it): fail those calls now rather than let
        // them wait out their timeouts.
        self.ready.send_replace((None, self.names.clone(), None));
        self.pending.fail_all();
    }

    fn wanted(&self) -> bool {
        !self.ready.is_closed()
    }

    async fn gone(&self) {
        self.ready.closed().await;
    }

    fn closed(&mut self) {
        // Closed for good: calls get `BrokerLost`, not a refusal of before.
        self.ready.send_modify(|ready| ready.2 = None);
    }
}

impl Replies {
    /// Takes replies until the consumer ends, acknowledging them in runs:
    /// every [`ACK_EVERY`], and what is left once none came for
    /// [`ACK_IDLE`].
    async fn take_replies(&self, channel: &Channel, mut consumer: Consumer) {
        let mut unacked = None;
        let mut taken = 0;
        loop {
            let next = match unacked {
                None => consumer.next().await,
                Some(tag) => tokio::select! {
                    next = consumer.next() => next,
                    () = tokio::time::sleep(ACK_IDLE) => {
                        self.ack(channel, tag).await;
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
                    return;
                }
                None => return,
            };
            let tag = delivery.delivery_tag;
            self.take(delivery);
            taken += 1;
            if taken < ACK_EVERY {
                unacked = Some(tag);
            } else {
                self.ack(channel, tag).await;
                unacked = None;
                taken = 0;
            }
        }
    }

    /// Acknowledges every reply up to `tag`. A failure means the channel
    /// is gone, and the consumer with it.
    async fn ack(&self, channel: &Channel, tag: u64) {
        let acked = channel
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await;
        if let Err(e) = acked {
            debug!(target: "callme::proxy", error = %e, "replies not acknowledged");
        }
    }

    /// Hands one reply's body to the call waiting for it, which reads it
    /// (see [`read`]).
    fn take(&self, delivery: Delivery) {
        let Some(corr) = delivery.properties.correlation_id().as_ref() else {
            debug!(target: "callme::proxy", "reply without correlation id dropped");
            return;
        };
        let Some(call) = self.pending.take(corr.as_str()) else {
            debug!(target: "callme::proxy", correlation_id = %corr.as_str().escape_debug(), "late or unknown reply dropped");
            return;
        };
        // The call may have ended since: then nobody reads it.
        let _ = call.send(delivery.data);
    }
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
