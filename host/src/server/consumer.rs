//! A served id's consumer: subscribing with its prefetch, taking deliveries, changing the prefetch live, cancelling.
//!
//! Each served id has a consumer on a channel of its own, with a prefetch
//! equal to its concurrency, and a [`Consuming`] loop that spawns a
//! [`Job`] per delivery within the id's share of calls. The loop runs on
//! the shared resubscribe loop, so it consumes again after a lost
//! connection; it holds the server weakly, so dropping every handle of a
//! server ends it.
//!
//! An id whose consumer was lost to a request the AMQP client cannot read
//! (see [`super::unreadable`]) consumes from then on on a connection of
//! its own: whoever sent that request may send more, and each would
//! otherwise take down the connection every other id is consumed on,
//! with every call in flight on it. On its own connection, it costs only
//! the callers of that id.

use std::sync::{Arc, Weak};

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{debug, info, warn};

use super::given_back::Taken;
use super::job::Job;
use super::reply::Replier;
use super::service::Service;
use super::{Inner, OwnLink, Server, unreadable};
use crate::Error;
use crate::amqp::connect::classify_lapin;
use crate::amqp::link::{self, CLOSE_TIMEOUT};
use crate::amqp::resubscribe::Subscription;
use crate::amqp::topology::{self, ServerQueue};
use crate::protocol::server_queue;

/// The consumer of a served id, as the registry keeps it.
#[derive(Clone)]
pub(super) struct ConsumerHandle {
    pub(super) channel: Channel,
    pub(super) tag: String,
    /// Hands a replacement consumer (same channel, new prefetch) to the
    /// consume loop.
    pub(super) handover: mpsc::UnboundedSender<Consumer>,
    /// The requests it has taken and not settled.
    pub(super) taken: Arc<Taken>,
}

/// Declares the exchange and queue of `id` on `channel`, binds them, and
/// starts a consumer with a prefetch of `concurrency`; returns its tag.
pub(super) async fn subscribe(
    channel: &Channel,
    id: &str,
    shape: ServerQueue,
    concurrency: usize,
) -> Result<(String, Consumer), Error> {
    topology::declare_server(channel, id, shape)
        .await
        .map_err(|e| refused(id, e))?;
    consume(channel, id, concurrency).await
}

/// Starts a consumer of `id`'s queue on `channel` with a prefetch of
/// `concurrency`; returns its tag.
async fn consume(
    channel: &Channel,
    id: &str,
    concurrency: usize,
) -> Result<(String, Consumer), Error> {
    channel
        .basic_qos(concurrency as u16, BasicQosOptions::default())
        .await
        .map_err(classify_lapin)?;
    let tag = consumer_tag(id);
    let consumer = channel
        .basic_consume(
            server_queue(id).as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| refused(id, e))?;
    Ok((tag, consumer))
}

/// A fresh consumer tag for `id`.
fn consumer_tag(id: &str) -> String {
    format!("callme-server-{id}-{}", uuid::Uuid::new_v4())
}

fn refused(id: &str, e: lapin::Error) -> Error {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    if let lapin::ErrorKind::ProtocolError(amqp) = e.kind()
        && matches!(
            amqp.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
        )
    {
        let queue = server_queue(id);
        return Error::Config(format!(
            "the queue `{queue}` already exists with other settings (the broker says: {}). \
             Every host serving `{id}` must declare it alike: the same --queue-type and \
             --queue-expires, and hosts older than durable server queues declared it otherwise. \
             Stop the other hosts of `{id}`, or delete the queue (rabbitmqctl delete_queue {queue})",
            amqp.get_message()
        ));
    }
    match classify_lapin(e) {
        Error::AccessRefused(text) => Error::AccessRefused(format!(
            "this user may not serve `{id}` (the broker refused access to its exchange or queue): {text}"
        )),
        other => other,
    }
}

/// Cancels a consumer. A cancel the broker refuses or does not confirm in
/// time closes the channel instead, so no consumer is left taking
/// requests. Calls running keep their channel until they have acked.
pub(super) async fn cancel(channel: &Channel, tag: &str) -> Result<(), Error> {
    // A channel that is gone has no consumer left to cancel.
    if !channel.status().connected() {
        return Ok(());
    }
    let cancel = channel.basic_cancel(tag.into(), BasicCancelOptions::default());
    match tokio::time::timeout(CLOSE_TIMEOUT, cancel).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) if !channel.status().connected() => Ok(()),
        Ok(Err(e)) => {
            topology::close_soon(channel.clone());
            Err(classify_lapin(e))
        }
        Err(_) => {
            topology::close_soon(channel.clone());
            Err(Error::Disconnected(
                "the broker did not confirm the cancel in time: the channel was closed".into(),
            ))
        }
    }
}

/// Gives a served id's consumer a new prefetch.
///
/// The broker applies a channel's prefetch to consumers made after it
/// (`basic.qos` with `global` false; RabbitMQ's "Consumer Prefetch"
/// guide), so the consumer is replaced. The new one starts on the same
/// channel before the old one is cancelled: the queue is never without a
/// consumer (an auto-delete queue would be deleted with its requests), and
/// requests the old one took stay acknowledgeable on the same channel.
/// Returns the new consumer's handle, or `None` when the channel is down
/// (the consume loop subscribes with the new prefetch when it is back).
pub(super) async fn change_prefetch(
    id: &str,
    current: &ConsumerHandle,
    concurrency: usize,
) -> Result<Option<ConsumerHandle>, Error> {
    let channel = &current.channel;
    if !channel.status().connected() {
        return Ok(None);
    }
    let replace = consume(channel, id, concurrency);
    let (tag, consumer) = match tokio::time::timeout(CLOSE_TIMEOUT, replace).await {
        Ok(replaced) => replaced?,
        Err(_) => {
            // The consume loop subscribes again on a new channel.
            topology::close_soon(channel.clone());
            return Err(Error::Disconnected(
                "the broker did not confirm the new prefetch in time: the channel was closed"
                    .into(),
            ));
        }
    };
    // The loop only reads it once the old consumer has ended.
    let _ = current.handover.send(consumer);
    cancel(channel, &current.tag).await?;
    Ok(Some(ConsumerHandle {
        tag,
        ..current.clone()
    }))
}

/// The consume loop of one served id.
pub(super) struct Consuming {
    pub(super) inner: Weak<Inner>,
    pub(super) id: String,
    pub(super) service: Arc<Service>,
    pub(super) slots: Arc<Semaphore>,
    pub(super) replier: Replier,
    /// Where replacement consumers come from.
    pub(super) handover: mpsc::UnboundedSender<Consumer>,
    /// Consumers that replace the current one on its channel (a new
    /// prefetch).
    pub(super) handed: mpsc::UnboundedReceiver<Consumer>,
    /// The last consumer ended because its connection could not be read:
    /// an unreadable request is to be taken out of the queue before
    /// consuming again (see [`super::unreadable`]).
    pub(super) unreadable: bool,
    /// The id's connection of its own, once a request it was sent could
    /// not be read; until then it is consumed on the server's.
    pub(super) own: Option<Arc<OwnLink>>,
    /// What the current consumer has taken (one for each subscription).
    pub(super) taken: Arc<Taken>,
}

impl Consuming {
    fn server(&self) -> Option<Server> {
        self.inner.upgrade().map(|inner| Server { inner })
    }

    /// Spawns a job per delivery until the consumer ends (cancelled, or
    /// its connection lost). A consumer cancelled because a replacement
    /// took over on the same channel is read to its end, then the
    /// replacement is. Returns whether the channel was lost (the requests
    /// `taken` holds then went back to the queue).
    async fn take(
        &mut self,
        channel: &Channel,
        mut consumer: Consumer,
        taken: &Arc<Taken>,
    ) -> bool {
        loop {
            let Some(delivery) = consumer.next().await else {
                match self.handed.try_recv() {
                    Ok(next) if channel.status().connected() => {
                        consumer = next;
                        continue;
                    }
                    _ => return !channel.status().connected(),
                }
            };
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => {
                    warn!(target: "callme::server", server_id = %self.id, error = %e, "consumer lost");
                    self.unreadable = unreadable::is_unreadable(&e);
                    return true;
                }
            };
            let Some(server) = self.server() else {
                return false;
            };
            let props = &delivery.properties;
            let holding = match (props.reply_to(), props.correlation_id()) {
                (Some(reply_to), Some(corr)) => {
                    let key =
                        server
                            .inner
                            .given_back
                            .key(&self.id, reply_to.as_str(), corr.as_str());
                    Some(taken.hold(delivery.delivery_tag, key))
                }
                // Dropped unanswered, whatever its count.
                _ => None,
            };
            // Both semaphores stay open for the server's lifetime.
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                return false;
            };
            let Ok(flight) = server.inner.in_flight.clone().acquire_owned().await else {
                return false;
            };
            if !delivery.acker.usable() {
                // Its channel closed while it waited for a slot: the broker
                // has put it back in the queue (noted as its holding goes).
                continue;
            }
            let job = Job {
                server,
                id: self.id.clone(),
                service: self.service.clone(),
                replier: self.replier.clone(),
                holding,
                _channel: channel.clone(),
                _own: self.own.clone(),
            };
            tokio::spawn(async move {
                job.handle(delivery).await;
                drop((slot, flight));
            });
        }
    }
}

impl Subscription for Consuming {
    fn what(&self) -> String {
        format!("server id {}", self.id)
    }

    async fn subscribe(&mut self, conn: &Connection) -> Result<Option<(Channel, Consumer)>, Error> {
        if std::mem::take(&mut self.unreadable) {
            let Some(server) = self.server() else {
                return Ok(None);
            };
            let inner = &server.inner;
            let prefetch = inner
                .registry
                .still_served(&self.id, &self.service)
                .unwrap_or(inner.options.concurrency);
            let look = unreadable::look_ahead(prefetch);
            // Every consumer of the lost connection was told it could not
            // be read; the id whose queue held the request moves. An id
            // with no request waiting is not looked at (nor opens a
            // connection to look). One the broker cannot tell about (the
            // connection failing again) tries again on the next.
            let waiting = match unreadable::waiting(conn, &self.id).await {
                Ok(waiting) => waiting,
                Err(e) => {
                    self.unreadable = true;
                    return Err(e);
                }
            };
            let looked = if waiting == 0 {
                debug!(target: "callme::server", server_id = %self.id, "no request waiting: not looked at for one the AMQP client cannot read, no connection opened");
                unreadable::Looked::default()
            } else {
                match unreadable::take_out(&inner.connect, &self.id, look, &inner.given_back).await
                {
                    Ok(looked) => looked,
                    Err(e) => {
                        warn!(target: "callme::server", server_id = %self.id, error = %e, "cannot look for an unreadable request");
                        unreadable::Looked::default()
                    }
                }
            };
            // Moved once one is found, taken out or not: one left in the
            // queue (its taking failed, or another host took requests
            // between the looks) costs only the id's own connection when
            // it comes back.
            if looked.found && self.own.is_none() {
                match inner.own_link().await {
                    Ok(Some((own, replier, shared))) => {
                        if shared {
                            warn!(target: "callme::server", server_id = %self.id, "a request to this id could not be read: the id is consumed, and answered, on a connection of its own from now on, shared with other ids sent such requests (as many have one as may), so that more such requests cost the server's other ids nothing");
                        } else {
                            warn!(target: "callme::server", server_id = %self.id, "a request to this id could not be read: the id is consumed, and answered, on a connection of its own from now on, so that more such requests cost no other id anything");
                        }
                        self.own = Some(own);
                        self.replier = replier;
                    }
                    Ok(None) => {
                        warn!(target: "callme::server", server_id = %self.id, "a request to this id could not be read, and no connection of its own could be had: it stays on the server's");
                    }
                    Err(e) => {
                        warn!(target: "callme::server", server_id = %self.id, error = %e.chain(), "cannot open a connection of its own for this id: it stays on the server's");
                    }
                }
            }
        }
        let Some(server) = self.server() else {
            return Ok(None);
        };
        let inner = &server.inner;
        // A moved id's consumer goes on its own connection, which the
        // consume loop waited for (`own_link`).
        let own_conn = match &self.own {
            Some(own) if own.link.is_closed() => {
                // Closed for good (without `auto_recover`): the server's, then.
                self.own = None;
                self.replier = inner.replier();
                None
            }
            Some(own) => Some(own.link.current().ok_or_else(|| {
                Error::Disconnected("the id's own connection is down: reconnecting".into())
            })?),
            None => None,
        };
        let conn = own_conn.as_deref().unwrap_or(conn);
        let _changing = inner.changes.lock(&self.id).await;
        // A replacement made meanwhile (a new prefetch while the loop
        // waited to subscribe) is on the channel the last consumer had,
        // not the one made here: dropped, it lets that channel go. Under
        // the lock, every later one is made on this subscription's.
        while self.handed.try_recv().is_ok() {}
        let Some(concurrency) = inner.registry.still_served(&self.id, &self.service) else {
            return Ok(None);
        };
        let shape = inner.options.queue_shape(&self.service);
        let (channel, (tag, consumer)) = topology::declare_on(conn, async |ch| {
            subscribe(ch, &self.id, shape, concurrency).await
        })
        .await?;
        self.taken = Taken::new(inner.given_back.clone());
        let handle = ConsumerHandle {
            channel: channel.clone(),
            tag,
            handover: self.handover.clone(),
            taken: self.taken.clone(),
        };
        inner.registry.set_consumer(&self.id, &self.service, handle);
        info!(target: "callme::server", server_id = %self.id, concurrency, "consuming");
        Ok(Some((channel, consumer)))
    }

    async fn consume(&mut self, _conn: &Arc<Connection>, channel: &Channel, consumer: Consumer) {
        let _consuming = crate::observe::consuming(&self.id);
        let taken = self.taken.clone();
        if self.server().is_some() && self.take(channel, consumer, &taken).await {
            // Back in the queue, from a host that lives: not held
            // against them when they come again.
            let went_back = taken.lost();
            if went_back > 0 {
                debug!(target: "callme::server", server_id = %self.id, requests = went_back, "requests in flight went back to the queue with the channel");
            }
        }
        taken.end();
        // A replacement made for that channel died with it.
        while self.handed.try_recv().is_ok() {}
    }

    fn own_link(&self) -> Option<watch::Receiver<link::State>> {
        self.own.as_ref().map(|own| own.link.subscribe())
    }

    fn wanted(&self) -> bool {
        self.server().is_some_and(|s| {
            s.inner
                .registry
                .still_served(&self.id, &self.service)
                .is_some()
        })
    }

    fn closed(&mut self) {
        debug!(target: "callme::server", server_id = %self.id, "connection closed: no longer served");
        if let Some(server) = self.server() {
            server.inner.registry.forget(&self.id, &self.service);
        }
    }
}
