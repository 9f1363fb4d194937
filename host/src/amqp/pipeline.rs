//! Replies pipelined on one confirm channel, by the shared reply exchange only.
//!
//! A publish to a caller's own reply exchange may close the channel it
//! goes on (the caller left and its exchange went with it), so those are
//! made one per channel at a time (`publisher`). The shared reply exchange
//! (`protocol::SHARED_REPLIES`) is durable and never deleted by callme, so
//! a reply to a caller that left is only unroutable there: returned under
//! `mandatory`, the channel untouched. Replies to it can share one channel
//! and be confirmed as the broker goes, as a raw server's are.
//!
//! The channel can still fail: the broker refuses this user the exchange
//! (its permissions, or an operator who deleted the exchange), or the
//! connection drops. A publish that fails, or is not plainly confirmed, is
//! reported as not sent, and the caller of [`Pipeline::publish`] sends the
//! reply the other way (by the caller's own exchange, on a lane of its
//! own): the pipeline only ever adds a way for a reply to arrive. After a
//! failure the pipeline stays off for a while before it is tried again, so
//! a refusal that lasts costs one failed publish per period, not one per
//! reply.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection, ExchangeKind};
use tokio::sync::{Notify, watch};
use tracing::{debug, info};

use super::connect::ConnectOptions;
use super::link::{self, Link, State};
use super::topology::{self, declare_on};
use crate::Error;
use crate::protocol::SHARED_REPLIES;

/// The routing key of the test publish made on each new channel: nobody
/// binds it, so the broker returns it.
const PROBE_KEY: &str = "_probe";

/// How long the test publish may take.
const PROBE_WITHIN: Duration = Duration::from_secs(15);

/// How often the channel's status is looked at, beside failed publishes.
const POLL_EVERY: Duration = Duration::from_millis(250);

/// First wait before the pipeline is tried again after a failure; it
/// doubles up to [`RETRY_MAX`], and starts again once the pipeline has
/// stayed up for [`RETRY_MAX`].
const RETRY_START: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// One confirm channel for replies to the shared reply exchange, kept open
/// across the link's connections.
pub(crate) struct Pipeline {
    channel: Mutex<Option<Channel>>,
    /// Told when a publish failed, so the channel is looked at at once.
    failed: Notify,
}

/// What became of a reply sent by the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piped {
    /// The broker took it and routed it to the caller's queue.
    Confirmed,
    /// Not sent, or not known to have arrived: no pipeline now, the
    /// broker returned it (no queue bound with that key), refused it, or
    /// the channel failed under it. Send it the other way.
    NotSent,
}

impl Pipeline {
    /// A pipeline on a connection of its own to the broker of `options`,
    /// kept by a task of its own until `server`, the server's link, is
    /// closed for good. Its own connection means that whatever the broker
    /// does to it (closing the channel, or the whole connection, over a
    /// refused publish) costs the server's consumers nothing.
    pub(crate) fn start(options: ConnectOptions, server: watch::Receiver<State>) -> Arc<Pipeline> {
        let pipeline = Arc::new(Pipeline {
            channel: Mutex::new(None),
            failed: Notify::new(),
        });
        tokio::spawn(keep(pipeline.clone(), options, server));
        pipeline
    }

    /// Publishes `body` to the shared reply exchange with routing key
    /// `key` (the caller's `reply_to`), `mandatory`, and waits for its
    /// confirm.
    pub(crate) async fn publish(
        &self,
        key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Piped {
        let Some(channel) = self.channel() else {
            return Piped::NotSent;
        };
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let sent = async {
            channel
                .basic_publish(SHARED_REPLIES.into(), key.into(), options, body, properties)
                .await?
                .await
        }
        .await;
        match sent {
            Ok(Confirmation::Ack(None)) => Piped::Confirmed,
            // Returned (nobody bound that key), or nacked: the channel is
            // fine; this reply goes the other way.
            Ok(Confirmation::Ack(Some(_)) | Confirmation::Nack(_) | Confirmation::NotRequested) => {
                Piped::NotSent
            }
            Err(e) => {
                debug!(target: "callme::server", error = %e, "pipelined reply failed");
                self.failed.notify_one();
                Piped::NotSent
            }
        }
    }

    /// Whether replies can be pipelined now.
    pub(crate) fn is_up(&self) -> bool {
        self.channel().is_some()
    }

    fn channel(&self) -> Option<Channel> {
        let channel = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        channel.as_ref().filter(|c| c.status().connected()).cloned()
    }

    fn set(&self, channel: Option<Channel>) {
        *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = channel;
    }
}

/// Whether the server's link is closed for good (or gone).
fn ended(server: &watch::Receiver<State>) -> bool {
    matches!(&*server.borrow(), State::Closed) || server.has_changed().is_err()
}

/// Waits `wait`; `false` when the server's link closed meanwhile.
async fn pause(wait: Duration, server: &mut watch::Receiver<State>) -> bool {
    let closed = tokio::select! {
        _ = tokio::time::sleep(wait) => false,
        _ = server.wait_for(|s| matches!(s, State::Closed)) => true,
    };
    !closed && !ended(server)
}

/// Connects, then opens the pipeline on each connection of its link, and
/// again after a failure once a backoff has passed; closes the link when
/// the server's is closed.
async fn keep(
    pipeline: Arc<Pipeline>,
    options: ConnectOptions,
    mut server: watch::Receiver<State>,
) {
    let mut retry = RETRY_START;
    // A refusal is logged when it is new, not on every retry.
    let mut last_refusal: Option<String> = None;
    let refused = |last: &mut Option<String>, why: String, retry: Duration| {
        if last.as_deref() != Some(why.as_str()) {
            info!(target: "callme::server", exchange = SHARED_REPLIES, reason = %why, retry_in = ?retry, "replies are not pipelined: each goes by its caller's own exchange");
            *last = Some(why);
        }
    };
    let own = loop {
        match Link::connect_auxiliary(&options, "callme replies").await {
            Ok(link) => break link,
            Err(e) => refused(&mut last_refusal, e.to_string(), retry),
        }
        if !pause(retry, &mut server).await {
            return;
        }
        retry = (retry * 2).min(RETRY_MAX);
    };
    let mut link = own.subscribe();
    loop {
        let conn = tokio::select! {
            conn = link::up(&mut link) => conn,
            _ = server.wait_for(|s| matches!(s, State::Closed)) => None,
        };
        let Some(conn) = conn.filter(|_| !ended(&server)) else {
            break;
        };
        match open(&conn).await {
            Ok(channel) => {
                info!(target: "callme::server", exchange = SHARED_REPLIES, "replies to callers bound to the shared reply exchange are pipelined");
                last_refusal = None;
                pipeline.set(Some(channel.clone()));
                let opened = Instant::now();
                watch_channel(&pipeline, &channel, &mut link, &mut server).await;
                pipeline.set(None);
                if channel.status().connected() {
                    topology::close_soon(channel);
                }
                if opened.elapsed() >= RETRY_MAX {
                    retry = RETRY_START;
                }
                debug!(target: "callme::server", exchange = SHARED_REPLIES, "reply pipeline closed");
            }
            Err(e) => refused(&mut last_refusal, e.to_string(), retry),
        }
        if !pause(retry, &mut server).await {
            break;
        }
        retry = (retry * 2).min(RETRY_MAX);
    }
    pipeline.set(None);
    own.close().await;
}

/// Declares the shared reply exchange (or finds it declared, when this
/// user may not declare it) and opens a confirm channel for replies.
async fn open(conn: &Connection) -> Result<Channel, Error> {
    let declared = declare_on(conn, async |channel| {
        topology::declare_shared_replies(channel)
            .await
            .map_err(super::connect::classify_lapin)
    })
    .await;
    let declared = match declared {
        Ok((channel, ())) => Ok(channel),
        // A user who may not configure it may still publish to it, if
        // the operator (or another host) declared it.
        Err(Error::AccessRefused(_)) => declare_on(conn, async |channel| {
            channel
                .exchange_declare(
                    SHARED_REPLIES.into(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        passive: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(super::connect::classify_lapin)
        })
        .await
        .map(|(channel, ())| channel),
        Err(e) => Err(e),
    }?;
    declared
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(super::connect::classify_lapin)?;
    // One publish nobody is bound to take, before any reply: a user who
    // may not write to the exchange learns it here, on a channel with
    // nothing else on it, not from a reply.
    let probe = async {
        declared
            .basic_publish(
                SHARED_REPLIES.into(),
                PROBE_KEY.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                b"",
                BasicProperties::default(),
            )
            .await?
            .await
    };
    match tokio::time::timeout(PROBE_WITHIN, probe).await {
        Ok(Ok(Confirmation::Ack(_))) => Ok(declared),
        Ok(Ok(other)) => Err(Error::Disconnected(format!(
            "the broker did not take a test publish to {SHARED_REPLIES}: {other:?}"
        ))),
        Ok(Err(e)) => Err(super::connect::classify_lapin(e)),
        Err(_) => {
            topology::close_soon(declared);
            Err(Error::Disconnected(format!(
                "the broker did not confirm a test publish to {SHARED_REPLIES} in time"
            )))
        }
    }
}

/// Resolves when `channel` is no longer usable, or the link moved on from
/// the connection it is on.
async fn watch_channel(
    pipeline: &Pipeline,
    channel: &Channel,
    link: &mut watch::Receiver<State>,
    server: &mut watch::Receiver<State>,
) {
    loop {
        tokio::select! {
            _ = pipeline.failed.notified() => {}
            _ = tokio::time::sleep(POLL_EVERY) => {}
            changed = link.changed() => if changed.is_err() { return },
            _ = server.wait_for(|s| matches!(s, State::Closed)) => return,
        }
        let link_up = matches!(&*link.borrow(), State::Up(_));
        if !link_up || !channel.status().connected() || ended(server) {
            return;
        }
    }
}
