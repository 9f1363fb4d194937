//! The server: consumes requests for server ids, dispatches them to plugins or native functions, replies.
//!
//! Each served id gets its exchange `server_ID_ex` and queue
//! `server_ID_queue`, a consumer on its own channel with a prefetch equal
//! to the concurrency, and up to that many calls in flight. Plugin calls
//! run on a dedicated executor, so CPU-heavy guests never starve the tasks
//! that talk to the broker. A request is acked only after its reply is
//! confirmed by the broker: a host that dies mid-call leaves the request to
//! be redelivered. Bad messages are answered with `BadRequest` (or logged
//! and dropped when they cannot be answered); they never stop the server.
//! When the broker connection is lost, the [`Link`] reconnects and each
//! served id declares its exchange and queue again and resumes consuming.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Consumer};
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, info, warn};

use crate::connection_builder::{ConnectOptions, classify_lapin};
use crate::link::{self, Link};
use crate::plugin::Plugin;
use crate::protocol::{
    Args, CONTENT_TYPE, DEFAULT_MAX_REQUEST_BYTES, DESCRIBE, Request, Response, is_valid_server_id,
    server_exchange, server_queue,
};
use crate::publisher::Publisher;
use crate::{Error, ErrorKind, RemoteError};

mod reply;

use reply::{Replier, Sent, Throttle, Undeliverable};

/// How a server declares its queues and runs calls.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Calls in flight per server id (the seed's `threaded`); also the
    /// consumer prefetch, so the broker hands out no more than can run.
    pub concurrency: usize,
    /// Declare exchange and queue durable.
    pub durable: bool,
    /// Declare exchange and queue auto-delete (the seed's default).
    pub auto_delete: bool,
    /// Largest request body accepted.
    pub max_request_bytes: usize,
    /// Threads that run plugin code.
    pub executor_threads: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            concurrency: 8,
            durable: false,
            auto_delete: true,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            executor_threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

type NativeFn = dyn Fn(Args) -> Result<Value, RemoteError> + Send + Sync;

/// Native Rust functions served under one server id (the seed's
/// `register_function`).
#[derive(Default, Clone)]
pub struct NativeFunctions {
    functions: HashMap<String, (String, Arc<NativeFn>)>,
}

impl NativeFunctions {
    /// An empty set.
    pub fn new() -> Self {
        NativeFunctions::default()
    }

    /// Registers `f` as `name`. `signature` is what `_describe` shows
    /// (e.g. `func(a: s64, b: s64) -> s64`). `f` runs on a blocking
    /// thread, so it may compute or block.
    pub fn register(
        &mut self,
        name: &str,
        signature: &str,
        f: impl Fn(Args) -> Result<Value, RemoteError> + Send + Sync + 'static,
    ) -> &mut Self {
        self.functions
            .insert(name.to_string(), (signature.to_string(), Arc::new(f)));
        self
    }

    fn describe(&self) -> Vec<Value> {
        let mut list: Vec<_> = self
            .functions
            .iter()
            .map(|(name, (sig, _))| json!({"name": name, "signature": sig}))
            .collect();
        list.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        list
    }
}

/// What answers a server id.
enum Service {
    Plugin(ArcSwap<Plugin>),
    Native(NativeFunctions),
}

struct Served {
    service: Arc<Service>,
    channel: Channel,
    consumer_tag: String,
    slots: Arc<Semaphore>,
    concurrency: usize,
    /// Hands a replacement consumer (same channel, new prefetch) to the
    /// consume loop.
    handover: mpsc::UnboundedSender<Consumer>,
}

/// A callme server: serves plugins and native functions by server id.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

struct Inner {
    link: Link,
    options: ServerOptions,
    served: Mutex<HashMap<String, Served>>,
    /// Held by whatever starts, swaps or stops a server id, so two of them
    /// for the same id never interleave (two consumers for one id, or a
    /// stop between a start's declare and its consume).
    changes: tokio::sync::Mutex<()>,
    executor: Executor,
    in_flight: Arc<Semaphore>,
    /// Requests answered and acked.
    answered: AtomicU64,
    /// Where replies are published, for every served id.
    publisher: Arc<Publisher>,
    /// Requests whose reply could never be delivered, acked without one.
    undeliverable: AtomicU64,
    /// Warnings callers can cause at will, logged at a bounded rate.
    noisy: Noisy,
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

/// The runtime plugin code runs on, shut down without blocking when the
/// server goes away (dropping a runtime inside async code would panic).
struct Executor(Option<tokio::runtime::Runtime>);

impl Executor {
    fn handle(&self) -> &tokio::runtime::Handle {
        // Only `Drop` takes the runtime out.
        self.0.as_ref().expect("executor is running").handle()
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

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
        check_concurrency(options.concurrency)?;
        let link = Link::connect(connect, "callme server").await?;
        let executor = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.executor_threads.max(1))
            .thread_name("callme-plugin")
            .enable_time()
            .build()
            .map_err(|e| Error::Config(format!("cannot start the plugin executor: {e}")))?;
        info!(target: "callme::server", broker = %connect.redacted(), "connected");
        let server = Server {
            inner: Arc::new(Inner {
                link,
                options,
                served: Mutex::new(HashMap::new()),
                changes: tokio::sync::Mutex::new(()),
                executor: Executor(Some(executor)),
                in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT as usize)),
                answered: AtomicU64::new(0),
                publisher: Arc::new(Publisher::new(REPLY_LANES)),
                undeliverable: AtomicU64::new(0),
                noisy: Noisy {
                    caller_gone: Throttle::new(NOISY_PERIOD),
                    access_refused: Throttle::new(NOISY_PERIOD),
                    not_sent: Throttle::new(NOISY_PERIOD),
                    unanswerable: Throttle::new(NOISY_PERIOD),
                },
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
        let _changing = self.inner.changes.lock().await;
        let id = plugin.name().to_string();
        let wanted = plugin
            .limits()
            .concurrency
            .unwrap_or(self.inner.options.concurrency);
        // Refused before anything changes: an invalid setting keeps the
        // version serving now, and its settings, as they are.
        check_concurrency(wanted)?;
        if !is_valid_server_id(&id) {
            return Err(invalid_id(&id));
        }
        plugin.start_prewarm(self.inner.executor.handle());
        let mut incoming = Some(plugin);
        let resize = {
            let mut served = self.inner.served.lock().unwrap_or_else(|p| p.into_inner());
            match served.get_mut(&id) {
                Some(existing) => match &*existing.service {
                    Service::Plugin(slot) => {
                        if let Some(plugin) = incoming.take() {
                            let old = slot.swap(Arc::new(plugin));
                            debug!(target: "callme::server", server_id = %id, old = %old.hash(), "swapped");
                        }
                        let before = existing.concurrency;
                        existing.concurrency = wanted;
                        Some((
                            existing.channel.clone(),
                            existing.consumer_tag.clone(),
                            existing.slots.clone(),
                            existing.handover.clone(),
                            before,
                        ))
                    }
                    Service::Native(_) => {
                        return Err(Error::Config(format!(
                            "server id `{id}` is served by native functions"
                        )));
                    }
                },
                None => None,
            }
        };
        match resize {
            Some((channel, tag, slots, handover, before)) => {
                if before != wanted {
                    resize_slots(&slots, before, wanted);
                    let resized = Resize {
                        id: &id,
                        channel: &channel,
                        old_tag: &tag,
                        handover: &handover,
                    };
                    if let Some(new_tag) = resized.prefetch(wanted).await? {
                        self.set_consumer_tag(&id, &tag, new_tag);
                    }
                    info!(target: "callme::server", server_id = %id, concurrency = wanted, "concurrency changed");
                }
                Ok(())
            }
            None => match incoming {
                Some(plugin) => {
                    self.start(id, Service::Plugin(ArcSwap::from_pointee(plugin)), wanted)
                        .await
                }
                None => Ok(()),
            },
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
        let _changing = self.inner.changes.lock().await;
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
    /// broker and it is acked (so it will not be delivered again).
    pub fn answered(&self) -> u64 {
        self.inner.answered.load(Ordering::Relaxed)
    }

    /// Requests whose reply could never be delivered (the caller's reply
    /// exchange does not exist, or this server may not publish to it):
    /// acked without a reply.
    pub fn undeliverable(&self) -> u64 {
        self.inner.undeliverable.load(Ordering::Relaxed)
    }

    /// Whether `server_id` is served.
    pub fn is_serving(&self, server_id: &str) -> bool {
        self.inner
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(server_id)
    }

    /// The plugin serving `server_id`, if a plugin does.
    pub fn plugin(&self, server_id: &str) -> Option<Arc<Plugin>> {
        let served = self.inner.served.lock().unwrap_or_else(|p| p.into_inner());
        match &*served.get(server_id)?.service {
            Service::Plugin(slot) => Some(slot.load_full()),
            Service::Native(_) => None,
        }
    }

    /// Stops serving `server_id`: its consumer is cancelled, calls running
    /// finish, and requests still queued stay for another host.
    ///
    /// # Errors
    ///
    /// Broker errors while cancelling.
    pub async fn stop_serving(&self, server_id: &str) -> Result<bool, Error> {
        let _changing = self.inner.changes.lock().await;
        let served = self
            .inner
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(server_id);
        let Some(served) = served else {
            return Ok(false);
        };
        // Its consume loop, finding the id no longer served, ends and does
        // not resume on a later connection.
        cancel(&served.channel, &served.consumer_tag).await?;
        info!(target: "callme::server", server_id, "stopped serving");
        Ok(true)
    }

    /// Stops taking requests and waits up to `grace` for the calls in
    /// flight to be answered and acked.
    pub async fn shutdown(&self, grace: Duration) {
        let ids: Vec<String> = self
            .inner
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        for id in ids {
            if let Err(e) = self.stop_serving(&id).await {
                warn!(target: "callme::server", server_id = %id, error = %e, "cancel failed");
            }
        }
        let all = tokio::time::timeout(grace, self.inner.in_flight.acquire_many(MAX_IN_FLIGHT));
        match all.await {
            Ok(_) => info!(target: "callme::server", "all calls answered"),
            Err(_) => {
                warn!(target: "callme::server", ?grace, "grace period over with calls still running")
            }
        }
        self.inner.link.close().await;
    }

    /// Resolves when the broker connection is closed for good: after
    /// [`Server::shutdown`], or when it is lost with `auto_recover` off.
    /// While it is being re-established, this waits.
    pub async fn closed(&self) {
        self.inner.link.closed().await;
    }

    /// Records the tag of the consumer that replaced `old` for `id`.
    fn set_consumer_tag(&self, id: &str, old: &str, new: String) {
        let mut served = self.inner.served.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = served.get_mut(id).filter(|s| s.consumer_tag == old) {
            s.consumer_tag = new;
        }
    }

    async fn start(&self, id: String, service: Service, concurrency: usize) -> Result<(), Error> {
        check_concurrency(concurrency)?;
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
        let (channel, (tag, consumer)) = link::declare_on(&conn, async |ch| {
            subscribe(ch, &id, &self.inner.options, concurrency).await
        })
        .await?;
        let service = Arc::new(service);
        let slots = Arc::new(Semaphore::new(concurrency));
        let (handover, handed) = mpsc::unbounded_channel();
        self.inner
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                id.clone(),
                Served {
                    service: service.clone(),
                    channel: channel.clone(),
                    consumer_tag: tag,
                    slots: slots.clone(),
                    concurrency,
                    handover,
                },
            );
        info!(target: "callme::server", server_id = %id, concurrency, "serving");
        let consuming = Consuming {
            inner: Arc::downgrade(&self.inner),
            replier: Replier::new(self.inner.link.subscribe(), self.inner.publisher.clone()),
            id,
            service,
            slots,
            handed,
        };
        tokio::spawn(consuming.run(channel, consumer));
        Ok(())
    }

    /// The concurrency of `id` if it is still served by `service` (and not
    /// stopped, or replaced by another service of the same name).
    fn still_served(&self, id: &str, service: &Arc<Service>) -> Option<usize> {
        let served = self.inner.served.lock().unwrap_or_else(|p| p.into_inner());
        served
            .get(id)
            .filter(|s| Arc::ptr_eq(&s.service, service))
            .map(|s| s.concurrency)
    }
}

/// Declares the exchange and queue of `id` on `channel`, binds them, and
/// starts a consumer with a prefetch of `concurrency`; returns its tag.
async fn subscribe(
    channel: &Channel,
    id: &str,
    opts: &ServerOptions,
    concurrency: usize,
) -> Result<(String, Consumer), Error> {
    link::declare_bound(
        channel,
        &server_exchange(id),
        &server_queue(id),
        ExchangeDeclareOptions {
            durable: opts.durable,
            auto_delete: opts.auto_delete,
            ..ExchangeDeclareOptions::default()
        },
        QueueDeclareOptions {
            durable: opts.durable,
            auto_delete: opts.auto_delete,
            ..QueueDeclareOptions::default()
        },
    )
    .await
    .map_err(|e| refused(id, e))?;
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

/// Cancels a consumer. A cancel the broker refuses or does not confirm in
/// time closes the channel instead, so no consumer is left taking
/// requests. Calls running keep their channel until they have acked.
async fn cancel(channel: &Channel, tag: &str) -> Result<(), Error> {
    // A channel that is gone has no consumer left to cancel.
    if !channel.status().connected() {
        return Ok(());
    }
    let cancel = channel.basic_cancel(tag.into(), BasicCancelOptions::default());
    match tokio::time::timeout(link::CLOSE_TIMEOUT, cancel).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) if !channel.status().connected() => Ok(()),
        Ok(Err(e)) => {
            link::close_soon(channel.clone());
            Err(classify_lapin(e))
        }
        Err(_) => {
            link::close_soon(channel.clone());
            Err(Error::Disconnected(
                "the broker did not confirm the cancel in time: the channel was closed".into(),
            ))
        }
    }
}

/// The consume loop of one served id, across reconnections. It holds the
/// server weakly: dropping every handle of a server ends it.
struct Consuming {
    inner: Weak<Inner>,
    id: String,
    service: Arc<Service>,
    slots: Arc<Semaphore>,
    replier: Replier,
    /// Consumers that replace the current one on its channel (a new
    /// prefetch).
    handed: mpsc::UnboundedReceiver<Consumer>,
}

impl Consuming {
    fn server(&self) -> Option<Server> {
        self.inner.upgrade().map(|inner| Server { inner })
    }

    async fn run(mut self, channel: Channel, consumer: Consumer) {
        let Some(mut state) = self.server().map(|s| s.inner.link.subscribe()) else {
            return;
        };
        let mut current = Some((channel, consumer));
        let mut attempt = 0;
        loop {
            if let Some((channel, consumer)) = current.take() {
                let since = Instant::now();
                self.consume(&channel, consumer).await;
                // A replacement made for that channel died with it.
                while self.handed.try_recv().is_ok() {}
                // Calls still running hold clones until they have acked.
                drop(channel);
                if since.elapsed() >= link::STEADY_AFTER {
                    attempt = 0;
                }
            }
            let still = self
                .server()
                .and_then(|s| s.still_served(&self.id, &self.service));
            if still.is_none() {
                debug!(target: "callme::server", server_id = %self.id, "consumer ended");
                return;
            }
            tokio::time::sleep(link::backoff(attempt)).await;
            attempt += 1;
            let Some(conn) = link::up(&mut state).await else {
                debug!(target: "callme::server", server_id = %self.id, "connection closed: no longer served");
                self.forget();
                return;
            };
            let Some(server) = self.server() else {
                return;
            };
            let _changing = server.inner.changes.lock().await;
            let Some(concurrency) = server.still_served(&self.id, &self.service) else {
                return;
            };
            let opts = &server.inner.options;
            let subscribed = link::declare_on(&conn, async |ch| {
                subscribe(ch, &self.id, opts, concurrency).await
            })
            .await;
            match subscribed {
                Ok((channel, (tag, consumer))) => {
                    if let Some(served) = server
                        .inner
                        .served
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_mut(&self.id)
                    {
                        served.channel = channel.clone();
                        served.consumer_tag = tag;
                    }
                    info!(target: "callme::server", server_id = %self.id, concurrency, "consuming");
                    current = Some((channel, consumer));
                }
                Err(e) if attempt > 3 => {
                    warn!(target: "callme::server", server_id = %self.id, attempt, error = %e, "cannot consume again yet")
                }
                Err(e) => {
                    debug!(target: "callme::server", server_id = %self.id, attempt, error = %e, "cannot consume again yet")
                }
            }
        }
    }

    /// Takes deliveries until the consumer ends (cancelled, or its
    /// connection lost), each call run as a task of its own. A consumer
    /// cancelled because a replacement took over on the same channel is
    /// read to its end, then the replacement is.
    async fn consume(&mut self, channel: &Channel, mut consumer: Consumer) {
        loop {
            let Some(delivery) = consumer.next().await else {
                match self.handed.try_recv() {
                    Ok(next) if channel.status().connected() => {
                        consumer = next;
                        continue;
                    }
                    _ => return,
                }
            };
            let delivery = match delivery {
                Ok(d) => d,
                Err(e) => {
                    warn!(target: "callme::server", server_id = %self.id, error = %e, "consumer lost");
                    return;
                }
            };
            let Some(server) = self.server() else {
                return;
            };
            // Both semaphores stay open for the server's lifetime.
            let Ok(slot) = self.slots.clone().acquire_owned().await else {
                return;
            };
            let Ok(flight) = server.inner.in_flight.clone().acquire_owned().await else {
                return;
            };
            if !delivery.acker.usable() {
                // Its channel closed while it waited for a slot: the broker
                // has put it back in the queue.
                continue;
            }
            let job = Job {
                server,
                id: self.id.clone(),
                service: self.service.clone(),
                replier: self.replier.clone(),
                _channel: channel.clone(),
            };
            tokio::spawn(async move {
                job.handle(delivery).await;
                drop((slot, flight));
            });
        }
    }

    /// Drops the id from the served ones, when the connection is closed
    /// for good and it can no longer be served.
    fn forget(&self) {
        if let Some(server) = self.server() {
            let mut served = server
                .inner
                .served
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if served
                .get(&self.id)
                .is_some_and(|s| Arc::ptr_eq(&s.service, &self.service))
            {
                served.remove(&self.id);
            }
        }
    }
}

/// Changes the calls in flight of one server id: the permits of its
/// semaphore, taken back as running calls finish.
fn resize_slots(slots: &Arc<Semaphore>, before: usize, after: usize) {
    if after > before {
        slots.add_permits(after - before);
    } else {
        let slots = slots.clone();
        let fewer = (before - after) as u32;
        tokio::spawn(async move {
            if let Ok(permits) = slots.acquire_many(fewer).await {
                permits.forget();
            }
        });
    }
}

/// A new prefetch for a served id's consumer.
///
/// The broker applies a channel's prefetch to consumers made after it
/// (`basic.qos` with `global` false; RabbitMQ's consumer prefetch guide),
/// so the consumer is replaced. The new one starts on the same channel
/// before the old one is cancelled: the queue is never without a
/// consumer (an auto-delete queue would be deleted with its requests), and
/// requests the old one took stay acknowledgeable on the same channel.
struct Resize<'a> {
    id: &'a str,
    channel: &'a Channel,
    old_tag: &'a str,
    handover: &'a mpsc::UnboundedSender<Consumer>,
}

impl Resize<'_> {
    /// The new consumer's tag, or `None` when the channel is down (the
    /// consume loop subscribes with the new prefetch when it is back).
    async fn prefetch(&self, concurrency: usize) -> Result<Option<String>, Error> {
        if !self.channel.status().connected() {
            return Ok(None);
        }
        let replace = async {
            self.channel
                .basic_qos(concurrency as u16, BasicQosOptions::default())
                .await
                .map_err(classify_lapin)?;
            let tag = consumer_tag(self.id);
            let consumer = self
                .channel
                .basic_consume(
                    server_queue(self.id).as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| refused(self.id, e))?;
            Ok::<_, Error>((tag, consumer))
        };
        let (tag, consumer) = match tokio::time::timeout(link::CLOSE_TIMEOUT, replace).await {
            Ok(replaced) => replaced?,
            Err(_) => {
                // The consume loop subscribes again on a new channel.
                link::close_soon(self.channel.clone());
                return Err(Error::Disconnected(
                    "the broker did not confirm the new prefetch in time: the channel was closed"
                        .into(),
                ));
            }
        };
        // The loop only reads it once the old consumer has ended.
        let _ = self.handover.send(consumer);
        cancel(self.channel, self.old_tag).await?;
        Ok(Some(tag))
    }
}

/// A fresh consumer tag for `id`.
fn consumer_tag(id: &str) -> String {
    format!("callme-server-{id}-{}", uuid::Uuid::new_v4())
}

/// The calls in flight a server id may have: also its prefetch, which the
/// broker reads as "unlimited" when 0, so 0 is never sent.
fn check_concurrency(concurrency: usize) -> Result<(), Error> {
    if concurrency == 0 || concurrency > u16::MAX as usize {
        return Err(Error::Config(format!(
            "concurrency must be between 1 and 65535, not {concurrency}"
        )));
    }
    Ok(())
}

fn invalid_id(id: &str) -> Error {
    Error::Config(format!(
        "invalid server id `{}`: use letters, digits, `-`, `_` and `.`",
        id.escape_debug()
    ))
}

fn refused(id: &str, e: lapin::Error) -> Error {
    match classify_lapin(e) {
        Error::AccessRefused(text) => Error::AccessRefused(format!(
            "this user may not serve `{id}` (the broker refused access to its exchange or queue): {text}"
        )),
        other => other,
    }
}

struct Job {
    server: Server,
    id: String,
    service: Arc<Service>,
    replier: Replier,
    /// The channel the request came on, kept open until it is acked.
    _channel: Channel,
}

impl Job {
    async fn handle(self, delivery: Delivery) {
        let started = Instant::now();
        let props = &delivery.properties;
        let reply_to = props.reply_to().as_ref().map(|s| s.to_string());
        let corr = props.correlation_id().as_ref().map(|s| s.to_string());
        let (Some(reply_to), Some(corr)) = (reply_to, corr) else {
            if let Some(held) = self.server.inner.noisy.unanswerable.admit() {
                warn!(target: "callme::server", server_id = %self.id, held_back = held, "request without reply_to or correlation_id dropped");
            }
            ack(&delivery).await;
            return;
        };
        let content_type = props.content_type().as_ref().map(|s| s.to_string());
        let outcome = match content_type.as_deref() {
            Some(ct) if ct != CONTENT_TYPE => Err(RemoteError::new(
                ErrorKind::BadRequest,
                format!("content type `{ct}` is not {CONTENT_TYPE}"),
            )),
            _ => match Request::decode(&delivery.data, self.server.inner.options.max_request_bytes)
            {
                Ok(request) => self.dispatch(request).await,
                Err(e) => Err(e),
            },
        };
        let failed = outcome.as_ref().err().map(|e| e.kind);
        let body = Response::from(outcome).encode();
        let inner = &self.server.inner;
        match self.replier.send(&reply_to, &corr, &body).await {
            Sent::Delivered => {
                if ack(&delivery).await {
                    inner.answered.fetch_add(1, Ordering::Relaxed);
                }
            }
            Sent::Undeliverable(why) => {
                // Nobody can ever receive it: running the request again
                // would only lose its reply again.
                inner.undeliverable.fetch_add(1, Ordering::Relaxed);
                let throttle = match why {
                    Undeliverable::CallerGone => &inner.noisy.caller_gone,
                    Undeliverable::AccessRefused => &inner.noisy.access_refused,
                };
                if let Some(held) = throttle.admit() {
                    let reason = match why {
                        Undeliverable::CallerGone => {
                            "reply dropped: the caller's reply exchange does not exist (it left, or never was)"
                        }
                        Undeliverable::AccessRefused => {
                            "reply dropped: this user may not publish to the caller's reply exchange"
                        }
                    };
                    info!(target: "callme::server", server_id = %self.id, reply_to = %reply_to.escape_debug(), held_back = held, "{reason}");
                }
                ack(&delivery).await;
            }
            Sent::Failed(e) => {
                // Given back once for another try (here or on another
                // host); a request that was already given back is dropped
                // rather than run in a loop.
                let requeue = !delivery.redelivered;
                if let Some(held) = inner.noisy.not_sent.admit() {
                    warn!(target: "callme::server", server_id = %self.id, error = %e, requeue, held_back = held, "reply not sent");
                }
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue,
                        ..BasicNackOptions::default()
                    })
                    .await;
            }
        }
        debug!(target: "callme::server", server_id = %self.id, correlation_id = %corr, error = ?failed, elapsed = ?started.elapsed(), "answered");
    }

    async fn dispatch(&self, request: Request) -> Result<Value, RemoteError> {
        let Request { func, args } = request;
        match &*self.service {
            Service::Plugin(slot) => {
                // Load once: the whole call runs on this version even if a
                // new one is swapped in meanwhile.
                let plugin = slot.load_full();
                if func == DESCRIBE {
                    let concurrency = plugin
                        .limits()
                        .concurrency
                        .unwrap_or(self.server.inner.options.concurrency);
                    return Ok(json!({
                        "server": self.id,
                        "version": plugin.hash(),
                        "concurrency": concurrency,
                        "reuse_instances": plugin.limits().reuse_instances,
                        "prewarm": plugin.limits().prewarm,
                        "functions": plugin.functions(),
                    }));
                }
                let task = self
                    .server
                    .inner
                    .executor
                    .handle()
                    .spawn(async move { plugin.call(&func, &args).await });
                match task.await {
                    Ok(r) => r.map_err(RemoteError::from),
                    Err(e) => Err(RemoteError::new(
                        ErrorKind::Internal,
                        format!("the call's task failed: {e}"),
                    )),
                }
            }
            Service::Native(functions) => {
                if func == DESCRIBE {
                    return Ok(json!({
                        "server": self.id,
                        "version": "native",
                        "functions": functions.describe(),
                    }));
                }
                let Some((_, f)) = functions.functions.get(&func) else {
                    let mut names: Vec<_> = functions.functions.keys().cloned().collect();
                    names.sort();
                    return Err(RemoteError::new(
                        ErrorKind::NoSuchFunction,
                        format!("no function `{func}` (available: {})", names.join(", ")),
                    ));
                };
                let f = f.clone();
                match tokio::task::spawn_blocking(move || f(args)).await {
                    Ok(r) => r,
                    Err(e) => Err(RemoteError::new(
                        ErrorKind::Internal,
                        format!("the function panicked: {e}"),
                    )),
                }
            }
        }
    }
}

/// Acks a request; whether the broker took the ack.
async fn ack(delivery: &Delivery) -> bool {
    match delivery.ack(BasicAckOptions::default()).await {
        Ok(true) => true,
        Ok(false) => {
            warn!(target: "callme::server", "ack not sent: the request's channel is closed; the broker will redeliver");
            false
        }
        Err(e) => {
            warn!(target: "callme::server", error = %e, "ack failed; the broker will redeliver");
            false
        }
    }
}
