//! Replies pipelined on one confirm channel, to callers' reply queues by the default exchange.
//!
//! A publish to a caller's own reply exchange may close the channel it
//! goes on (the caller left and its exchange went with it), so those are
//! made one per channel at a time (`publisher`). The default exchange
//! (`""`) always exists and routes by queue name, and a proxy's reply
//! queue exists exactly as long as the proxy: a reply published there to
//! a caller that left is dropped by the broker (no `mandatory`), the
//! channel untouched. Replies that go that way can share one channel and
//! be confirmed as the broker goes, as a raw server's are; a confirm means
//! the reply reached its caller's queue or that its caller is gone, and
//! either way the request is done.
//!
//! The channel can still fail: the broker refuses this user the default
//! exchange, or the connection drops. A publish that fails, or is not
//! plainly confirmed within 2 s, is reported as not sent, and the caller of
//! [`Pipeline::publish`] sends the reply the other way (by the caller's
//! own exchange, on a lane of its own): the pipeline only ever adds a way
//! for a reply to arrive. A failure or a missed confirm closes the
//! pipeline, and it stays off for a while before it is tried again, so a
//! trouble that lasts costs one failed publish per period, not one per
//! reply. Replies over 1 MiB are never pipelined (`MAX_BODY`): a body
//! the broker refuses for its size closes the channel it came on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::{Notify, watch};
use tracing::{debug, info};

use super::connect::ConnectOptions;
use super::link::{self, Link, State};
use super::topology;
use crate::Error;

/// The exchange replies are pipelined to: the default exchange, which
/// routes by queue name.
const DEFAULT_EXCHANGE: &str = "";

/// How long a pipelined reply may wait for its confirm before it is sent
/// the other way (a connection that stopped answering is found out by
/// its heartbeat only much later).
const CONFIRM_WITHIN: Duration = Duration::from_secs(2);

/// The largest reply pipelined: RabbitMQ refuses a message over its
/// `max_message_size` (16 MiB by default in 4.x) by closing the channel,
/// which would fail every reply pipelined beside it.
const MAX_BODY: usize = 1 << 20;

/// The routing key of the test publish made on each new channel: no queue
/// has that name, so the broker drops it.
const PROBE_KEY: &str = "callme.pipeline.probe";

/// How long the test publish may take.
const PROBE_WITHIN: Duration = Duration::from_secs(15);

/// How often the channel's status is looked at, beside failed publishes.
const POLL_EVERY: Duration = Duration::from_millis(250);

/// First wait before the pipeline is opened again after it failed or was
/// refused; it doubles up to [`RETRY_MAX`] while it keeps failing, and
/// starts again once a pipeline has lived [`RETRY_MAX`].
const RETRY_START: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// One confirm channel for replies by the default exchange, kept open
/// across the link's connections.
pub(crate) struct Pipeline {
    /// The channel, with the number it was opened as: a publish that
    /// failed closes only the channel it went on, not a newer one.
    channel: Mutex<Option<(u64, Channel)>>,
    /// How many channels were opened.
    opened: AtomicU64,
    /// Told when a publish failed, so the channel is looked at at once.
    failed: Notify,
    /// The task keeping the pipeline, until it has closed its connection.
    keeper: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// What became of a reply sent by the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piped {
    /// The broker took it: it is in the caller's queue, or the caller is
    /// gone.
    Confirmed,
    /// Not sent, or not known to have arrived: no pipeline now, the broker
    /// refused it, the channel failed under it, or its confirm did not
    /// come in time. Send it the other way.
    NotSent,
}

impl Pipeline {
    /// A pipeline on a connection of its own to the broker of `options`,
    /// kept by a task of its own until `server`, the server's link, is
    /// closed for good. Its own connection means that whatever the broker
    /// does to it (closing the channel, or the whole connection, over a
    /// refused publish) costs the server's consumers nothing.
    pub(crate) fn start(options: ConnectOptions, server: watch::Receiver<State>) -> Arc<Pipeline> {
        let pipeline = Pipeline::off();
        let keeper = tokio::spawn(keep(pipeline.clone(), options, server));
        *pipeline.keeper.lock().unwrap_or_else(|p| p.into_inner()) = Some(keeper);
        pipeline
    }

    /// A pipeline that is never opened: every reply goes by its caller's
    /// own exchange.
    pub(crate) fn off() -> Arc<Pipeline> {
        Arc::new(Pipeline {
            channel: Mutex::new(None),
            opened: AtomicU64::new(0),
            failed: Notify::new(),
            keeper: Mutex::new(None),
        })
    }

    /// Waits, up to `limit`, until the pipeline has closed its connection
    /// after the server's link was closed.
    pub(crate) async fn closed(&self, limit: Duration) {
        let keeper = self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(keeper) = keeper {
            let _ = tokio::time::timeout(limit, keeper).await;
        }
    }

    /// Publishes `body` to the default exchange with routing key `queue`
    /// (the caller's reply queue), and waits for its confirm. A body over
    /// [`MAX_BODY`] is not sent.
    pub(crate) async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Piped {
        if body.len() > MAX_BODY {
            return Piped::NotSent;
        }
        let Some((number, channel)) = self.current() else {
            return Piped::NotSent;
        };
        let sent = async {
            channel
                .basic_publish(
                    DEFAULT_EXCHANGE.into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await?
                .await
        };
        match tokio::time::timeout(CONFIRM_WITHIN, sent).await {
            Ok(Ok(Confirmation::Ack(_))) => Piped::Confirmed,
            // Nacked: the channel is fine; this reply goes the other way.
            Ok(Ok(Confirmation::Nack(_) | Confirmation::NotRequested)) => Piped::NotSent,
            Ok(Err(e)) => {
                debug!(target: "callme::server", error = %e, "pipelined reply failed");
                self.failed.notify_one();
                Piped::NotSent
            }
            Err(_) => {
                // A connection that stopped answering, or one the broker
                // holds back: the pipeline is closed at once, so the
                // replies behind this one do not each wait as long.
                debug!(target: "callme::server", "pipelined reply not confirmed in time");
                self.take(number);
                self.failed.notify_one();
                Piped::NotSent
            }
        }
    }

    /// Whether replies can be pipelined now.
    pub(crate) fn is_up(&self) -> bool {
        self.current().is_some()
    }

    fn current(&self) -> Option<(u64, Channel)> {
        let channel = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        channel
            .as_ref()
            .filter(|(_, c)| c.status().connected())
            .cloned()
    }

    /// Puts `channel` to use; its number.
    fn set(&self, channel: Channel) -> u64 {
        let number = self.opened.fetch_add(1, Ordering::Relaxed) + 1;
        *self.channel.lock().unwrap_or_else(|p| p.into_inner()) = Some((number, channel));
        number
    }

    /// Stops using the channel numbered `number`, if it is still the one
    /// in use.
    fn take(&self, number: u64) {
        let mut channel = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        if channel.as_ref().is_some_and(|(n, _)| *n == number) {
            *channel = None;
        }
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
/// the server's is closed. A connection whose pipeline the broker refuses
/// is closed while the pipeline waits to be tried again, so a host whose
/// user may not publish to the default exchange holds no second
/// connection (RabbitMQ counts connections against a user's and a
/// vhost's `max-connections` limits).
async fn keep(
    pipeline: Arc<Pipeline>,
    options: ConnectOptions,
    mut server: watch::Receiver<State>,
) {
    let mut keeper = Keeper {
        pipeline,
        retry: RETRY_START,
        last_refusal: None,
    };
    loop {
        let Some(connected) = connect(&options, &mut server).await else {
            break;
        };
        let turn = match connected {
            Ok(own) => {
                let turn = if ended(&server) {
                    Turn::Stop
                } else {
                    keeper.on(&mut own.subscribe(), &mut server).await
                };
                own.close().await;
                turn
            }
            Err(e) => {
                keeper.refused(e.to_string());
                Turn::Reconnect
            }
        };
        let go_on = match turn {
            Turn::Stop => false,
            Turn::Reconnect => keeper.pause(&mut server).await,
            Turn::ReconnectNow => !ended(&server),
        };
        if !go_on {
            break;
        }
    }
}

/// Connects the pipeline's own link; `None` when the server's link closed
/// first. A connection still being made then is closed once made, by a
/// task of its own, so a host that stopped leaves none behind and its
/// shutdown does not wait for it.
async fn connect(
    options: &ConnectOptions,
    server: &mut watch::Receiver<State>,
) -> Option<Result<Link, Error>> {
    let options = options.clone();
    let mut connecting =
        Box::pin(async move { Link::connect_auxiliary(&options, "callme replies").await });
    tokio::select! {
        connected = &mut connecting => Some(connected),
        _ = server.wait_for(|s| matches!(s, State::Closed)) => {
            tokio::spawn(async move {
                if let Ok(own) = connecting.await {
                    own.close().await;
                }
            });
            None
        }
    }
}

/// What ends one connection of the pipeline.
enum Turn {
    /// The server's link is closed for good: so is the pipeline.
    Stop,
    /// The broker refused the pipeline, or its connection closed for
    /// good: connect again after the backoff.
    Reconnect,
    /// Its connection closed for good while the backoff was being waited:
    /// connect again at once.
    ReconnectNow,
}

/// What [`keep`] carries from one connection to the next.
struct Keeper {
    pipeline: Arc<Pipeline>,
    /// The next wait before trying again.
    retry: Duration,
    /// The last refusal logged: one is logged when it is new, not on
    /// every retry.
    last_refusal: Option<String>,
}

impl Keeper {
    fn refused(&mut self, why: String) {
        if self.last_refusal.as_deref() != Some(why.as_str()) {
            info!(target: "callme::server", reason = %why, retry_in = ?self.retry, "replies are not pipelined: each goes by its caller's own exchange");
            self.last_refusal = Some(why);
        }
    }

    /// Waits the backoff and doubles it; `false` when the server's link
    /// closed meanwhile.
    async fn pause(&mut self, server: &mut watch::Receiver<State>) -> bool {
        let go_on = pause(self.retry, server).await;
        self.retry = (self.retry * 2).min(RETRY_MAX);
        go_on
    }

    /// Opens the pipeline on each connection of `link` until the broker
    /// refuses it, the link closes for good, or the server's link does.
    async fn on(
        &mut self,
        link: &mut watch::Receiver<State>,
        server: &mut watch::Receiver<State>,
    ) -> Turn {
        // Whether the backoff was just waited, so it is not waited twice.
        let mut paused = false;
        loop {
            let conn = tokio::select! {
                conn = link::up(link) => conn,
                _ = server.wait_for(|s| matches!(s, State::Closed)) => None,
            };
            if ended(server) {
                return Turn::Stop;
            }
            let Some(conn) = conn else {
                // Its own link gave up reconnecting (`auto_recover` off):
                // the pipeline connects again by itself.
                info!(target: "callme::server", "the reply pipeline's connection closed: replies go by each caller's own exchange until it is back");
                return if paused {
                    Turn::ReconnectNow
                } else {
                    Turn::Reconnect
                };
            };
            let opened = tokio::select! {
                opened = open(&conn) => opened,
                _ = server.wait_for(|s| matches!(s, State::Closed)) => return Turn::Stop,
            };
            let channel = match opened {
                Ok(channel) => channel,
                Err(e) => {
                    self.refused(e.to_string());
                    return Turn::Reconnect;
                }
            };
            info!(target: "callme::server", "replies are pipelined by the default exchange to callers that name their reply queue");
            self.last_refusal = None;
            let number = self.pipeline.set(channel.clone());
            let opened = std::time::Instant::now();
            watch_channel(&self.pipeline, number, &channel, link, server).await;
            self.pipeline.take(number);
            // A pipeline that lived a while starts its backoff again; one
            // that keeps failing as soon as it opens waits longer each
            // time.
            if opened.elapsed() >= RETRY_MAX {
                self.retry = RETRY_START;
            }
            if channel.status().connected() {
                topology::close_soon(channel);
            }
            debug!(target: "callme::server", "reply pipeline closed");
            if !self.pause(server).await {
                return Turn::Stop;
            }
            paused = true;
        }
    }
}

/// Opens a confirm channel for replies, and makes one test publish on it.
async fn open(conn: &Connection) -> Result<Channel, Error> {
    let late = || Error::Disconnected("the broker did not open a channel in time".into());
    let channel = tokio::time::timeout(PROBE_WITHIN, conn.create_channel())
        .await
        .map_err(|_| late())?
        .map_err(super::connect::classify_lapin)?;
    // One publish nobody receives, before any reply: a user who may not
    // write to the default exchange learns it here, on a channel with
    // nothing else on it, not from a reply.
    let probe = async {
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channel
            .basic_publish(
                DEFAULT_EXCHANGE.into(),
                PROBE_KEY.into(),
                BasicPublishOptions::default(),
                b"",
                BasicProperties::default(),
            )
            .await?
            .await
    };
    let refused = match tokio::time::timeout(PROBE_WITHIN, probe).await {
        Ok(Ok(Confirmation::Ack(_))) => return Ok(channel),
        Ok(Ok(other)) => Error::Disconnected(format!(
            "the broker did not take a test publish to the default exchange: {other:?}"
        )),
        Ok(Err(e)) => super::connect::classify_lapin(e),
        Err(_) => Error::Disconnected(
            "the broker did not confirm a test publish to the default exchange in time".into(),
        ),
    };
    if channel.status().connected() {
        topology::close_soon(channel);
    }
    Err(refused)
}

/// Resolves when `channel` is no longer usable, or the link moved on from
/// the connection it is on.
async fn watch_channel(
    pipeline: &Pipeline,
    number: u64,
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
        let kept = pipeline
            .channel
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|(n, _)| *n == number);
        if !link_up || !kept || !channel.status().connected() || ended(server) {
            return;
        }
    }
}
