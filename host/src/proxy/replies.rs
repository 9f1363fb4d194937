//! The proxy's reply queue and its consumer, across reconnections.
//!
//! The reply exchange and queue keep their names for the proxy's life, so
//! a caller's `reply_to` never changes. The queue is exclusive to the
//! connection: when the connection is lost, so are the replies on their
//! way, and the calls waiting for them are failed at once. On each new
//! connection the names are declared again and the proxy is ready again.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::BasicConsumeOptions;
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

/// The proxy's reply exchange and queue.
#[derive(Clone)]
pub(super) struct ReplyNames {
    pub(super) exchange: String,
    pub(super) queue: String,
    consumer_tag: String,
}

impl ReplyNames {
    /// The names of a proxy of broker user `user`, unique by `uid`.
    pub(super) fn new(user: &str, uid: &str) -> ReplyNames {
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
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                self.consumer_tag.as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
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

/// The reply consumer: hands each reply to the call waiting for it, and
/// tells the proxy on which connection it can publish.
pub(super) struct Replies {
    pub(super) names: ReplyNames,
    pub(super) pending: Arc<Pending>,
    /// The connection the reply queue is consumed on, while there is one;
    /// closed when the proxy is dropped.
    pub(super) ready: watch::Sender<Option<Arc<Connection>>>,
}

impl Subscription for Replies {
    fn what(&self) -> String {
        format!("reply queue of {}", self.names.exchange)
    }

    async fn subscribe(&mut self, conn: &Connection) -> Result<Option<(Channel, Consumer)>, Error> {
        self.names.declare(conn).await.map(Some)
    }

    async fn consume(&mut self, conn: &Arc<Connection>, _channel: &Channel, consumer: Consumer) {
        self.ready.send_replace(Some(conn.clone()));
        self.take_replies(consumer).await;
        // Replies to calls sent on that connection went with it (the reply
        // queue is exclusive to it): fail those calls now rather than let
        // them wait out their timeouts.
        self.ready.send_replace(None);
        self.pending.fail_all();
    }

    fn wanted(&self) -> bool {
        !self.ready.is_closed()
    }

    async fn gone(&self) {
        self.ready.closed().await;
    }
}

impl Replies {
    /// Takes replies until the consumer ends.
    async fn take_replies(&self, mut consumer: Consumer) {
        while let Some(delivery) = consumer.next().await {
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => {
                    // A proxy being dropped closes its connection under
                    // the consumer: that is no loss worth a warning.
                    if self.ready.is_closed() {
                        debug!(target: "callme::proxy", error = %e, "reply consumer closed with the proxy");
                    } else {
                        warn!(target: "callme::proxy", error = %e, "reply consumer lost");
                    }
                    return;
                }
            };
            let Some(corr) = delivery.properties.correlation_id().as_ref() else {
                debug!(target: "callme::proxy", "reply without correlation id dropped");
                continue;
            };
            let response = Response::decode(&delivery.data).unwrap_or_else(|e| {
                Response::Error(RemoteError::new(
                    ErrorKind::Internal,
                    format!("malformed reply: {e}"),
                ))
            });
            if !self.pending.answer(corr.as_str(), response) {
                debug!(target: "callme::proxy", correlation_id = %corr, "late or unknown reply dropped");
            }
        }
    }
}
