//! The server: consumes requests for server ids, dispatches them to plugins or native functions, replies.
//!
//! Each served id gets its exchange `server_ID_ex` and queue
//! `server_ID_queue`, a consumer on its own channel with a prefetch equal
//! to the concurrency, and up to that many calls in flight. Plugin calls
//! run on a dedicated executor, so CPU-heavy guests never starve the tasks
//! that talk to the broker (on a nearly idle host a call starts where it
//! was taken, and moves there at its first wait or yield). A request is
//! acked only after its reply is confirmed by the broker: a host that dies
//! mid-call leaves the request to be redelivered. Bad messages are answered with `BadRequest` (or logged
//! and dropped when they cannot be answered); they never stop the server.
//! One the AMQP client cannot even read costs the host its connection
//! once, and is then taken out of its queue (`unreadable`).
//! When the broker connection is lost, the link reconnects and each
//! served id declares its exchange and queue again and resumes consuming.
//!
//! - `registry`: the served ids, their services and shares of calls;
//! - `changes`: the lock each id's start, swap, stop and retirement take;
//! - `service`: what answers an id (a plugin or native functions);
//! - `consumer`: an id's consumer: subscribe, prefetch, the consume loop;
//! - `job`: one request from delivery to ack;
//! - `reply`: publishing replies and what became of them;
//! - `unreadable`: taking a request the AMQP client cannot read out of
//!   its queue;
//! - `given_back`: the requests the host gave back and lived through,
//!   which the delivery limit does not count.

mod changes;
mod consumer;
mod given_back;
mod job;
mod registry;
mod reply;
mod runtimes;
mod service;
mod unreadable;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, warn};

use consumer::{ConsumerHandle, Consuming};
use registry::{Entry, Registry, Share, Swap, check_concurrency};
use reply::{Replier, Throttle};
use runtimes::Executor;
pub use service::NativeFunctions;
use service::Service;

use crate::amqp::echo::Echo;
use crate::amqp::pipeline::Pipeline;
use crate::amqp::publisher::Publisher;
use crate::amqp::topology::{self, ServerQueue};
use crate::amqp::{ConnectOptions, Link, resubscribe};
use crate::plugin::Plugin;
use crate::protocol::{DEFAULT_MAX_REQUEST_BYTES, QueueType, is_valid_server_id};
use crate::{DEFAULT_TIMEOUT, Error, Proxy};

/// How a server declares its queues and runs calls.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Calls in flight per server id (the seed's `threaded`); also the
    /// consumer prefetch, so the broker hands out no more than can run.
    pub concurrency: usize,
    /// The type of the server queues: classic, or quorum (replicated
    /// over a RabbitMQ cluster).
    pub queue_type: QueueType,
    /// How long a server queue without consumers lives before the broker
    /// deletes it (`x-expires`); `None`: until deleted. A host that stops
    /// gracefully deletes its queue at once if nobody else consumes from
    /// it and nothing waits in it.
    pub queue_expires: Option<Duration>,
    /// Deliveries after which a request is refused rather than run again
    /// (quorum queues count them: a request that keeps killing its hosts
    /// stops there); the caller gets an `Internal` error.
    pub delivery_limit: u32,
    /// Largest request body accepted.
    pub max_request_bytes: usize,
    /// Threads that run plugin code.
    pub executor_threads: usize,
    /// Whether replies may be pipelined by the default exchange to callers
    /// that name their reply queue (see `docs/protocol.md`, "Pipelined
    /// replies"): one more connection to the broker, opened while the
    /// broker lets this user publish to `amq.default`. Off: every reply
    /// goes by its caller's own exchange, one per channel at a time.
    pub pipeline_replies: bool,
    /// How long a reply may wait for the broker's confirm, once written,
    /// before it counts as not sent: its request is then given back once
    /// for another try, as for a reply that failed. A caller's reply
    /// queue that stops confirming (on a node cut off from its cluster)
    /// would otherwise hold the call's slot, and its request unacked,
    /// until RabbitMQ's `consumer_timeout` (30 minutes by default) closed
    /// the channel under every other call on it. At most
    /// [`MAX_REPLY_CONFIRM_LIMIT`].
    pub reply_confirm_limit: Duration,
}

/// How long a reply waits for the broker's confirm by default.
pub const DEFAULT_REPLY_CONFIRM_LIMIT: Duration = Duration::from_secs(120);

/// The longest a reply may wait for its confirm: with a call's deadline of
/// at most 25 minutes, the request is acked within RabbitMQ's default
/// `consumer_timeout` of 30 minutes, with a minute to spare for the waits
/// around the call (for a slot, for a lane to publish on).
pub const MAX_REPLY_CONFIRM_LIMIT: Duration = Duration::from_secs(240);

/// How long a server queue nobody consumes from lives by default.
pub const DEFAULT_QUEUE_EXPIRES: Duration = Duration::from_secs(60);

/// Deliveries of one request after which it is not run again, by default.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 3;

impl ServerOptions {
    /// Refuses options no server can run with, before anything is
    /// connected: the command line bounds them, a program may not.
    fn check(&self) -> Result<(), Error> {
        check_concurrency(self.concurrency)?;
        if self.delivery_limit == 0 {
            return Err(Error::Config(
                "delivery_limit must be at least 1: a request is delivered once before it runs"
                    .into(),
            ));
        }
        if self.reply_confirm_limit.is_zero() || self.reply_confirm_limit > MAX_REPLY_CONFIRM_LIMIT
        {
            return Err(Error::Config(format!(
                "reply_confirm_limit must be more than 0 and at most {MAX_REPLY_CONFIRM_LIMIT:?} \
                 (within RabbitMQ's default consumer_timeout), not {:?}",
                self.reply_confirm_limit
            )));
        }
        if self.max_request_bytes == 0 {
            return Err(Error::Config(
                "max_request_bytes must be at least 1: no request fits in 0 bytes".into(),
            ));
        }
        // RabbitMQ takes `x-expires` from 1 ms to 2^32 - 1 ms (its
        // "Time-to-Live and Expiration" guide), and refuses the queue
        // otherwise, at every serve.
        if let Some(expires) = self.queue_expires
            && (expires < Duration::from_millis(1)
                || expires > Duration::from_millis(u64::from(u32::MAX)))
        {
            return Err(Error::Config(format!(
                "queue_expires must be between 1 ms and {} ms, not {expires:?}",
                u32::MAX
            )));
        }
        Ok(())
    }

    /// How the queue of an id served by `service` is declared: its own
    /// queue type if it has one, else the server's.
    fn queue_shape(&self, service: &Service) -> ServerQueue {
        ServerQueue {
            quorum: service.queue_type().unwrap_or(self.queue_type) == QueueType::Quorum,
            expires: self.queue_expires,
        }
    }
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            concurrency: 8,
            queue_type: QueueType::Classic,
            queue_expires: Some(DEFAULT_QUEUE_EXPIRES),
            delivery_limit: DEFAULT_DELIVERY_LIMIT,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            executor_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            pipeline_replies: true,
            reply_confirm_limit: DEFAULT_REPLY_CONFIRM_LIMIT,
        }
    }
}

/// A callme server: serves plugins and native functions by server id.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

struct Inner {
    link: Link,
    /// How the link connects, for connections of a moment (taking out an
    /// unreadable request).
    connect: ConnectOptions,
    options: ServerOptions,
    registry: Registry<ConsumerHandle>,
    /// Held, for an id, by whatever starts, swaps or stops it, so two of
    /// them for the same id never interleave (two consumers for one id,
    /// or a stop between a start's declare and its consume).
    changes: changes::Changes,
    executor: Executor,
    /// Where spare instances are made and used ones dropped, at the
    /// lowest CPU priority.
    background: Executor,
    in_flight: Arc<Semaphore>,
    /// Requests answered and acked.
    answered: AtomicU64,
    /// Requests this host gave back to the broker and lived through: not
    /// counted by the delivery limit.
    given_back: Arc<given_back::GivenBack>,
    /// Where replies are published, for every served id.
    publisher: Arc<Publisher>,
    /// Where replies to callers that name their reply queue are pipelined
    /// first.
    pipeline: Arc<Pipeline>,
    /// Requests whose reply could never be delivered, acked without one.
    undeliverable: AtomicU64,
    /// Which `reply_to` the broker can name in an error this host can
    /// read: only those are answered.
    echo: Echo,
    /// Warnings callers can cause at will, logged at a bounded rate.
    noisy: Noisy,
    /// The AMQP user, whose name the proxy's reply queue carries.
    user: String,
    /// The proxy plugins granted `rpc` call through, on a connection of
    /// its own (so that whoever may publish to its reply queue can cost
    /// the server's requests nothing): made when the first such plugin is
    /// served.
    calls_out: tokio::sync::OnceCell<Proxy>,
    /// The connections of their own that ids sent an unreadable request
    /// consume and reply on ([`consumer`]): closed at shutdown, after the
    /// calls in flight; at most [`MAX_OWN_LINKS`] at once.
    own_links: std::sync::Mutex<Vec<std::sync::Weak<OwnLink>>>,
    /// The retirement of each id stopped lately ([`retire`]), ended when
    /// the id is served again: that serving's requests are not its to
    /// look after, and a second stop retires them itself.
    retiring: std::sync::Mutex<HashMap<String, tokio::task::AbortHandle>>,
    /// One permit per connection of its own an id may open.
    own_slots: Arc<Semaphore>,
}

/// A connection of its own for ids sent an unreadable request, holding one
/// of [`MAX_OWN_LINKS`] until the last call on it has ended; with the
/// publisher their replies go by.
pub(super) struct OwnLink {
    pub(super) link: Link,
    publisher: Arc<Publisher>,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

/// Most connections of their own that ids sent an unreadable request may
/// have: past that, such an id shares the one of those that fewest use,
/// so that a caller can neither make the host open connections without
/// bound nor, by sending to more ids, reach the server's connection again.
const MAX_OWN_LINKS: usize = 8;

impl Inner {
    fn retiring(&self) -> std::sync::MutexGuard<'_, HashMap<String, tokio::task::AbortHandle>> {
        self.retiring.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replies on the server's connection.
    fn replier(&self) -> Replier {
        Replier::new(
            self.link.subscribe(),
            self.publisher.clone(),
            self.pipeline.clone(),
            self.options.reply_confirm_limit,
        )
    }

    /// A connection of its own for an id, or, once [`MAX_OWN_LINKS`] are
    /// open, the one of those fewest use (`true` then); with the replier
    /// that publishes on it. `None` when none is open after all.
    async fn own_link(&self) -> Result<Option<(Arc<OwnLink>, Replier, bool)>, Error> {
        let replier = |own: &OwnLink| {
            Replier::new(
                own.link.subscribe(),
                own.publisher.clone(),
                self.pipeline.clone(),
                self.options.reply_confirm_limit,
            )
        };
        let Ok(slot) = self.own_slots.clone().try_acquire_owned() else {
            let links = self.own_links.lock().unwrap_or_else(|p| p.into_inner());
            let least = links
                .iter()
                .filter_map(std::sync::Weak::upgrade)
                .filter(|own| !own.link.is_closed())
                .min_by_key(Arc::strong_count);
            return Ok(least.map(|own| {
                let replier = replier(&own);
                (own, replier, true)
            }));
        };
        let link = Link::connect_auxiliary(&self.connect, "callme server (one id)").await?;
        let own = Arc::new(OwnLink {
            link,
            publisher: Arc::new(Publisher::new(REPLY_LANES)),
            _slot: slot,
        });
        let replier = replier(&own);
        let mut links = self.own_links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|l| l.strong_count() > 0);
        links.push(Arc::downgrade(&own));
        Ok(Some((own, replier, false)))
    }
}

/// The warnings any caller can trigger, each logged at most once per
/// [`NOISY_PERIOD`] with a count of those held back.
struct Noisy {
    caller_gone: Throttle,
    access_refused: Throttle,
    not_sent: Throttle,
    unanswerable: Throttle,
}

const NOISY_PERIOD: Duration = Duration::from_secs(10);

/// Replies in flight to the broker at once, each on a channel of its own
/// until confirmed; more wait for a free channel. It bounds the channels
/// a server opens for replies, whatever its callers do.
const REPLY_LANES: usize = 64;

/// Calls in flight across the whole server; far above any concurrency
/// setting, it only exists so shutdown can wait for them.
const MAX_IN_FLIGHT: u32 = 1 << 20;

impl Server {
    /// Connects to the broker.
    ///
    /// # Errors
    ///
    /// As [`ConnectOptions::connect`], or [`Error::Config`] for an invalid
    /// option.
    pub async fn connect(
        connect: &ConnectOptions,
        options: ServerOptions,
    ) -> Result<Server, Error> {
        options.check()?;
        let user = connect.user(&connect.parse()?);
        let link = Link::connect(connect, "callme server").await?;
        let executor = Executor::plugins(options.executor_threads)?;
        let background = Executor::background()?;
        info!(target: "callme::server", broker = %link.first_node(), "connected");
        let pipeline = if options.pipeline_replies {
            Pipeline::start(connect.clone(), link.subscribe())
        } else {
            info!(target: "callme::server", "replies are not pipelined (turned off): each goes by its caller's own exchange");
            Pipeline::off()
        };
        let server = Server {
            inner: Arc::new(Inner {
                link,
                connect: connect.clone(),
                options,
                registry: Registry::new(),
                changes: changes::Changes::default(),
                executor,
                background,
                in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize)),
                answered: AtomicU64::new(0),
                given_back: Arc::default(),
                publisher: Arc::new(Publisher::new(REPLY_LANES)),
                pipeline,
                undeliverable: AtomicU64::new(0),
                echo: Echo::of(connect),
                own_links: std::sync::Mutex::new(Vec::new()),
                retiring: std::sync::Mutex::default(),
                own_slots: Arc::new(Semaphore::new(MAX_OWN_LINKS)),
                noisy: Noisy {
                    caller_gone: Throttle::new(NOISY_PERIOD),
                    access_refused: Throttle::new(NOISY_PERIOD),
                    not_sent: Throttle::new(NOISY_PERIOD),
                    unanswerable: Throttle::new(NOISY_PERIOD),
                },
                user,
                calls_out: tokio::sync::OnceCell::new(),
            }),
        };
        Ok(server)
    }

    /// Serves `plugin` under its name, or swaps it in atomically if that
    /// server id is already served by a plugin: calls running finish on
    /// the old version, new calls use the new one.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid id or one served by native
    /// functions; broker errors when declaring or consuming fails
    /// ([`Error::AccessRefused`] when the broker's permissions forbid it).
    pub async fn serve_plugin(&self, plugin: Plugin) -> Result<(), Error> {
        let id = plugin.name().to_string();
        let _changing = self.inner.changes.lock(&id).await;
        let wanted = plugin
            .settings()
            .concurrency
            .unwrap_or(self.inner.options.concurrency);
        // Refused before anything changes: an invalid setting keeps the
        // version serving now, and its settings, as they are.
        check_concurrency(wanted)?;
        if !is_valid_server_id(&id) {
            return Err(invalid_id(&id));
        }
        let deadline = plugin.settings().limits.deadline;
        if deadline > crate::plugin::MAX_DEADLINE {
            return Err(Error::Config(format!(
                "`{id}`'s deadline of {deadline:?} is over the {:?} a served call may take: \
                 RabbitMQ closes the channel of a consumer holding a request longer than its \
                 consumer_timeout (30 minutes by default), less the time to reply",
                crate::plugin::MAX_DEADLINE
            )));
        }
        if let Some(serving) = self.inner.registry.plugin(&id) {
            let default = self.inner.options.queue_type;
            let now = serving.settings().queue_type.unwrap_or(default);
            let next = plugin.settings().queue_type.unwrap_or(default);
            if now != next {
                return Err(Error::Config(format!(
                    "`{id}` is served with a {now:?} queue and cannot switch to {next:?} while served: \
                     remove the plugin, let its queue go, then deploy it again"
                )));
            }
        }
        if plugin.settings().capabilities.rpc.is_granted() {
            let inner = &self.inner;
            inner
                .calls_out
                .get_or_try_init(|| async {
                    // Reconnects by itself whatever the server's
                    // `auto_recover`: the server goes on serving when
                    // this connection alone is lost (a reply the AMQP
                    // client cannot read is enough), and a link closed
                    // for good would fail every later call out until the
                    // server is dropped. It closes with the server's.
                    let options = ConnectOptions {
                        auto_recover: true,
                        ..inner.connect.clone()
                    };
                    let link =
                        Link::connect_auxiliary(&options, "callme server (calls out)").await?;
                    let echo = Echo::of(&inner.connect);
                    let proxy = Proxy::over(link, &inner.user, echo, DEFAULT_TIMEOUT).await?;
                    // What a server takes by default: the guest's text is
                    // held to it, but written out again a request can
                    // grow (`9e15` is `9000000000000000.0`).
                    proxy.set_max_request_bytes(crate::protocol::DEFAULT_MAX_REQUEST_BYTES);
                    let server = inner.link.subscribe();
                    let calls_out = proxy.clone();
                    tokio::spawn(async move {
                        closed_for_good(server).await;
                        calls_out.close().await;
                    });
                    Ok::<_, Error>(proxy)
                })
                .await?;
        }
        {
            // Inside the executor, which rescues what the background
            // thread does not start in time (not this runtime, which
            // talks to the broker).
            let _executor = self.inner.executor.handle().enter();
            plugin.start_prewarm(self.inner.background.handle());
        }
        match self.inner.registry.swap_plugin(&id, plugin, wanted)? {
            Swap::NotServed(plugin) => {
                self.start(id, Service::Plugin(ArcSwap::from_pointee(plugin)), wanted)
                    .await
            }
            Swap::Swapped { resized: None } => {
                info!(target: "callme::server", server_id = %id, "swapped");
                Ok(())
            }
            Swap::Swapped {
                resized: Some(current),
            } => {
                info!(target: "callme::server", server_id = %id, concurrency = wanted, "swapped; concurrency changed");
                if let Some(replaced) = consumer::change_prefetch(&id, &current, wanted).await? {
                    let is_current = |h: &ConsumerHandle| h.tag == current.tag;
                    self.inner
                        .registry
                        .replace_consumer(&id, is_current, replaced);
                }
                Ok(())
            }
        }
    }

    /// Serves native functions under `server_id`.
    ///
    /// # Errors
    ///
    /// As [`Server::serve_plugin`].
    pub async fn serve_native(
        &self,
        server_id: &str,
        functions: NativeFunctions,
    ) -> Result<(), Error> {
        let _changing = self.inner.changes.lock(server_id).await;
        if self.is_serving(server_id) {
            return Err(Error::Config(format!(
                "server id `{server_id}` is already served"
            )));
        }
        let concurrency = self.inner.options.concurrency;
        self.start(
            server_id.to_string(),
            Service::Native(functions),
            concurrency,
        )
        .await
    }

    /// Requests answered and acked since the server started, over every
    /// server id: a request is counted once its reply is confirmed by the
    /// broker and it is acked (so it will not be delivered again). A
    /// pipelined reply to a caller that left is dropped by the broker
    /// unseen, and counted here.
    pub fn answered(&self) -> u64 {
        self.inner.answered.load(Ordering::Relaxed)
    }

    /// Requests whose reply could never be delivered (the caller's reply
    /// exchange does not exist, or this server may not publish to it):
    /// acked without a reply. Only replies sent by the caller's exchange:
    /// see [`Server::answered`] for pipelined ones.
    pub fn undeliverable(&self) -> u64 {
        self.inner.undeliverable.load(Ordering::Relaxed)
    }

    /// Whether replies to callers that name their reply queue
    /// (`protocol::REPLY_QUEUE`) are pipelined now: the host has its reply
    /// connection and may publish to the default exchange. When not, every
    /// reply goes by its caller's own exchange.
    pub fn replies_pipelined(&self) -> bool {
        self.inner.pipeline.is_up()
    }

    /// Whether `server_id` is served.
    pub fn is_serving(&self, server_id: &str) -> bool {
        self.inner.registry.contains(server_id)
    }

    /// The plugin serving `server_id`, if a plugin does.
    pub fn plugin(&self, server_id: &str) -> Option<Arc<Plugin>> {
        self.inner.registry.plugin(server_id)
    }

    /// Stops serving `server_id`: its consumer is cancelled, calls running
    /// finish, and requests still queued stay for another host. Once its
    /// calls here are done, its queue is deleted if no other host consumes
    /// from it and nothing waits in it, so callers get `NoSuchServer` at
    /// once rather than wait for the queue to expire.
    ///
    /// # Errors
    ///
    /// Broker errors while cancelling.
    pub async fn stop_serving(&self, server_id: &str) -> Result<bool, Error> {
        self.stop_serving_if(server_id, false).await
    }

    /// [`Server::stop_serving`] if a plugin serves `server_id`: an id
    /// served by native functions stays served (a file of the plugins
    /// directory named after it has no say over it).
    pub(crate) async fn stop_serving_plugin(&self, server_id: &str) -> Result<bool, Error> {
        self.stop_serving_if(server_id, true).await
    }

    async fn stop_serving_if(&self, server_id: &str, plugin_only: bool) -> Result<bool, Error> {
        // Held until its retirement is known: no serving of the id comes
        // in between (see [`Inner::retiring`]).
        let _changing = self.inner.changes.lock(server_id).await;
        if plugin_only && self.inner.registry.plugin(server_id).is_none() {
            return Ok(false);
        }
        let Some(served) = self.stop_locked(server_id).await? else {
            return Ok(false);
        };
        let shape = self.inner.options.queue_shape(&served.service);
        let retiring = tokio::spawn(retire(
            Arc::downgrade(&self.inner),
            server_id.to_string(),
            served.share,
            served.consumer.taken,
            shape,
        ));
        let mut all = self.inner.retiring();
        all.retain(|_, r| !r.is_finished());
        if let Some(earlier) = all.insert(server_id.to_string(), retiring.abort_handle()) {
            earlier.abort();
        }
        Ok(true)
    }

    /// Cancels the consumer of `server_id` and forgets it.
    async fn stop(&self, server_id: &str) -> Result<Option<Entry<ConsumerHandle>>, Error> {
        let _changing = self.inner.changes.lock(server_id).await;
        self.stop_locked(server_id).await
    }

    /// [`Server::stop`], its caller holding the id's lock.
    async fn stop_locked(&self, server_id: &str) -> Result<Option<Entry<ConsumerHandle>>, Error> {
        let Some(served) = self.inner.registry.remove(server_id) else {
            return Ok(None);
        };
        // Its consume loop, finding the id no longer served, ends and does
        // not resume on a later connection.
        consumer::cancel(&served.consumer.channel, &served.consumer.tag).await?;
        info!(target: "callme::server", server_id, "stopped serving");
        Ok(Some(served))
    }

    /// Stops taking requests and waits up to `grace` for the calls in
    /// flight to be answered and acked; then deletes the queues nobody
    /// else consumes from and nothing waits in, and closes the broker
    /// connections. It returns within `grace` and [`SHUTDOWN_TIDY_LIMIT`] more,
    /// however slow the broker: a broker that does not answer only makes
    /// it skip the tidying up.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutdown_by(grace_ends(grace)).await;
    }

    /// [`Server::shutdown`] with its grace period ending at `by`
    /// ([`grace_ends`]).
    pub(crate) async fn shutdown_by(&self, by: tokio::time::Instant) {
        let mut stopped = Vec::new();
        // Every id at once: one at a time, with many ids and a slow
        // broker, the ids not cancelled yet went on taking requests, and
        // the grace period began late.
        let mut stopping = tokio::task::JoinSet::new();
        for id in self.inner.registry.ids() {
            let server = self.clone();
            stopping.spawn(async move {
                let outcome = server.stop(&id).await;
                (id, outcome)
            });
        }
        let cancelling = async {
            while let Some(done) = stopping.join_next().await {
                let Ok((id, outcome)) = done else { continue };
                match outcome {
                    Ok(Some(served)) => {
                        let shape = self.inner.options.queue_shape(&served.service);
                        stopped.push((id, shape, served.consumer.taken));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(target: "callme::server", server_id = %id, error = %e.chain(), "cancel failed")
                    }
                }
            }
        };
        // A cancel the broker leaves unanswered takes up to its own time
        // limit; past the grace period, the connection's close below ends
        // what is left of them.
        if tokio::time::timeout_at(by, cancelling).await.is_err() {
            warn!(target: "callme::server", "grace period over before the broker confirmed every cancel");
        }
        stopping.abort_all();
        let all = tokio::time::timeout_at(by, self.inner.in_flight.acquire_many(MAX_IN_FLIGHT));
        // Held to the end: a request taken but still waiting for its turn
        // does not start now only to be cut by the close below; it goes
        // back to its queue with its channel.
        let _all = match all.await {
            Ok(all) => {
                info!(target: "callme::server", "all calls answered");
                all.ok()
            }
            Err(_) => {
                warn!(target: "callme::server", "grace period over with calls still running");
                None
            }
        };
        if tokio::time::timeout(SHUTDOWN_TIDY_LIMIT, self.tidy_up(stopped))
            .await
            .is_err()
        {
            warn!(target: "callme::server", limit = ?SHUTDOWN_TIDY_LIMIT, "the broker did not let the host tidy up in time: leaving its queues and connections as they are");
        }
    }

    /// Deletes the queues of the ids `stopped` that nothing else uses, and
    /// closes every broker connection of this server.
    async fn tidy_up(&self, stopped: Vec<(String, ServerQueue, Arc<given_back::Taken>)>) {
        if let Some(conn) = self.inner.link.current() {
            // At once: a quorum queue whose leader does not answer takes
            // its whole time to be left alone.
            let mut deleting = tokio::task::JoinSet::new();
            for (id, shape, taken) in stopped {
                let conn = conn.clone();
                deleting.spawn(async move {
                    // Requests of it still held here (a call past the
                    // grace period, one waiting for its turn) go back to
                    // it when the connection closes: it stays for them.
                    if !taken.let_go(LET_GO_WITHIN).await {
                        info!(target: "callme::server", server_id = %id, "queue kept: requests taken here go back to it");
                        return;
                    }
                    topology::delete_server_queue_if_idle(&conn, &id, shape).await;
                });
            }
            while deleting.join_next().await.is_some() {}
        }
        let own: Vec<_> = self
            .inner
            .own_links
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        // All at once: each close waits up to its own time limit for a
        // broker that does not answer.
        let calls_out = async {
            if let Some(calls_out) = self.inner.calls_out.get() {
                calls_out.close().await;
            }
        };
        tokio::join!(
            self.inner.link.close(),
            futures_util::future::join_all(own.iter().map(|own| own.link.close())),
            calls_out,
        );
        self.inner
            .pipeline
            .closed(crate::amqp::link::CLOSE_TIMEOUT)
            .await;
    }

    /// The runtime plugin calls run on, for plugin work the server does
    /// not start itself (a new version's first instance, say).
    pub(crate) fn plugin_executor(&self) -> tokio::runtime::Handle {
        self.inner.executor.handle().clone()
    }

    /// Resolves when the broker connection is closed for good: after
    /// [`Server::shutdown`], or when it is lost with `auto_recover` off.
    /// While it is being re-established, this waits.
    pub async fn closed(&self) {
        self.inner.link.closed().await;
    }

    /// Waits until the broker connection is up; `false` once it is
    /// closed for good.
    pub(crate) async fn up(&self) -> bool {
        crate::amqp::link::up(&mut self.inner.link.subscribe())
            .await
            .is_some()
    }

    async fn start(&self, id: String, service: Service, concurrency: usize) -> Result<(), Error> {
        let share = Share::new(concurrency)?;
        if !is_valid_server_id(&id) {
            return Err(invalid_id(&id));
        }
        let Some(conn) = self.inner.link.current() else {
            let why = if self.inner.link.is_closed() {
                "closed"
            } else {
                "down (reconnecting)"
            };
            return Err(Error::Disconnected(format!(
                "cannot serve `{id}`: the broker connection is {why}"
            )));
        };
        let shape = self.inner.options.queue_shape(&service);
        // Another host that stopped serving the id may delete its idle
        // queue between this declare and the consume: declared again.
        let mut attempts = 0;
        let (channel, (tag, first)) = loop {
            attempts += 1;
            let declared = topology::declare_on(&conn, async |ch| {
                consumer::subscribe(ch, &id, shape, concurrency).await
            })
            .await;
            match declared {
                Err(Error::Connection(e))
                    if attempts < 3 && crate::amqp::connect::is_not_found(&e) =>
                {
                    debug!(target: "callme::server", server_id = %id, "queue deleted while declared; declaring again");
                }
                other => break other?,
            }
        };
        let service = Arc::new(service);
        let slots = share.slots();
        let (handover, handed) = mpsc::unbounded_channel();
        // Under the id's lock, so its retirement is not deleting the
        // queue right now: it would also look after this serving's
        // requests, and, stopped again, delete the queue under them.
        if let Some(earlier) = self.inner.retiring().remove(&id) {
            earlier.abort();
        }
        let taken = given_back::Taken::new(self.inner.given_back.clone());
        let handle = ConsumerHandle {
            channel: channel.clone(),
            tag,
            handover: handover.clone(),
            taken: taken.clone(),
        };
        self.inner.registry.insert(
            &id,
            Entry {
                service: service.clone(),
                share,
                consumer: handle,
            },
        );
        info!(target: "callme::server", server_id = %id, concurrency, "serving");
        let consuming = Consuming {
            inner: Arc::downgrade(&self.inner),
            replier: self.inner.replier(),
            id,
            service,
            slots,
            handover,
            handed,
            unreadable: false,
            own: None,
            taken,
        };
        tokio::spawn(resubscribe::run(
            consuming,
            self.inner.link.subscribe(),
            (conn, channel, first),
        ));
        Ok(())
    }
}

/// How long a stopped id's queue deletion is retried while requests wait
/// in it (they expire within their callers' timeouts) or another host
/// still consumes from it.
const RETIRE_FOR: Duration = Duration::from_secs(30);

/// How long a stopped id's consumer, cancelled, may take to end before
/// its queue is kept as though it still held requests.
const LET_GO_WITHIN: Duration = Duration::from_secs(1);

/// Longest time [`Server::shutdown`] takes past its grace period to delete
/// the queues it leaves and close its connections.
pub const SHUTDOWN_TIDY_LIMIT: Duration = crate::amqp::link::CLOSE_TIMEOUT;

/// After the last call of a stopped id here has finished, deletes its
/// queue if it is idle and nothing of it is held here, retrying while
/// requests wait in it; gives up when the id is served here again, the
/// server is gone, or [`RETIRE_FOR`] has passed (the queue then expires
/// by itself).
async fn retire(
    inner: std::sync::Weak<Inner>,
    id: String,
    share: Share,
    taken: Arc<given_back::Taken>,
    shape: ServerQueue,
) {
    let calls = share.concurrency() as u32;
    let _ = tokio::time::timeout(RETIRE_FOR, share.slots().acquire_many(calls)).await;
    let until = tokio::time::Instant::now() + RETIRE_FOR;
    loop {
        // A call still running (past `RETIRE_FOR`), or one taken and not
        // started: its request goes back to this queue if the connection
        // is lost, so the queue stays while it is here.
        let let_go = taken.let_go(LET_GO_WITHIN).await;
        if !let_go && inner.strong_count() == 0 {
            return;
        }
        if let_go {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            // Under the lock serving takes: an id served again declares
            // its queue and starts consuming before this looks, or after
            // this has deleted the old one, never in between.
            let _changing = inner.changes.lock(&id).await;
            if inner.registry.contains(&id) {
                return;
            }
            if let Some(conn) = inner.link.current()
                && topology::delete_server_queue_if_idle(&conn, &id, shape).await
            {
                debug!(target: "callme::server", server_id = %id, "queue deleted");
                return;
            }
        }
        if tokio::time::Instant::now() >= until {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn invalid_id(id: &str) -> Error {
    Error::Config(format!(
        "invalid server id `{}`: use letters, digits, `-`, `_` and `.`",
        id.escape_debug()
    ))
}

/// Resolves when the server's link is closed for good, or gone with the
/// server.
async fn closed_for_good(mut server: tokio::sync::watch::Receiver<crate::amqp::link::State>) {
    let _ = server
        .wait_for(|s| matches!(s, crate::amqp::link::State::Closed))
        .await;
}

/// When a grace period of `grace` from now ends: a period too long for
/// the clock (`--grace` of `u64::MAX` seconds, meant as "wait for every
/// call") ends 30 years from now rather than overflowing.
pub(crate) fn grace_ends(grace: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(grace)
        .unwrap_or_else(|| now + Duration::from_secs(30 * 365 * 24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn options_no_server_can_run_with_are_refused_before_connecting() {
        // Nothing listens there: a refusal must come before any connect.
        let nowhere = ConnectOptions::new("amqp://guest:guest@127.0.0.1:1/%2f");
        for (what, options) in [
            (
                "concurrency",
                ServerOptions {
                    concurrency: 0,
                    ..Default::default()
                },
            ),
            (
                "delivery_limit",
                ServerOptions {
                    delivery_limit: 0,
                    ..Default::default()
                },
            ),
            (
                "max_request_bytes",
                ServerOptions {
                    max_request_bytes: 0,
                    ..Default::default()
                },
            ),
            (
                "queue_expires",
                ServerOptions {
                    queue_expires: Some(Duration::ZERO),
                    ..Default::default()
                },
            ),
            (
                "queue_expires",
                ServerOptions {
                    queue_expires: Some(Duration::from_secs(50 * 24 * 3600)),
                    ..Default::default()
                },
            ),
            (
                "reply_confirm_limit",
                ServerOptions {
                    reply_confirm_limit: Duration::ZERO,
                    ..Default::default()
                },
            ),
            (
                "reply_confirm_limit",
                ServerOptions {
                    reply_confirm_limit: Duration::from_secs(241),
                    ..Default::default()
                },
            ),
        ] {
            match Server::connect(&nowhere, options).await {
                Err(Error::Config(message)) => assert!(message.contains(what), "{message}"),
                Err(e) => panic!("{what}: expected a Config error, got {e}"),
                Ok(_) => panic!("{what}: connected"),
            }
        }
    }
}
