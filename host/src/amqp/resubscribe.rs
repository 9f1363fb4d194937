//! The one consume loop that outlives connections: consume, and when the consumer ends, subscribe again.
//!
//! A server id's request consumer and a proxy's reply consumer both live
//! across reconnections of their [`super::Link`]. This loop is theirs:
//! it consumes until the consumer ends (cancelled, its channel or its
//! connection lost), backs off, waits for the link to be up, and
//! subscribes again on the current connection. What is declared, what a
//! delivery does and when to stop is the [`Subscription`]'s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::{Channel, Connection, Consumer};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::link::{self, State};
use crate::Error;

/// A consumer that lived this long before it ended is followed by a prompt
/// re-subscription; one that ends sooner backs off further each time.
const STEADY_AFTER: Duration = Duration::from_secs(10);

/// Failed attempts to subscribe again that are only logged at debug level
/// (a broker coming back often refuses the first few).
const QUIET_ATTEMPTS: u32 = 3;

/// A consumer's owner, as the loop sees it.
pub(crate) trait Subscription {
    /// What the logs call it (`server id calc`, `reply queue`).
    fn what(&self) -> String;

    /// Declares what the consumer needs on a new channel of `conn` and
    /// starts consuming; `Ok(None)` when it is no longer wanted.
    async fn subscribe(&mut self, conn: &Connection) -> Result<Option<(Channel, Consumer)>, Error>;

    /// Takes deliveries until `consumer` ends; `conn` is the connection
    /// it is on.
    async fn consume(&mut self, conn: &Arc<Connection>, channel: &Channel, consumer: Consumer);

    /// Whether to subscribe again after a consumer ended.
    fn wanted(&self) -> bool;

    /// The state of a link of the subscription's own, to wait for instead
    /// of the shared link's before subscribing again (a server id moved
    /// to a connection of its own); by default none.
    fn own_link(&self) -> Option<watch::Receiver<State>> {
        None
    }

    /// Resolves when the owner is gone, ending the loop at once (by
    /// default: never).
    async fn gone(&self) {
        std::future::pending::<()>().await
    }

    /// The link closed for good.
    fn closed(&mut self) {}
}

/// Runs `subscription` from its first consumer until it is no longer
/// wanted, its owner is gone, or the link closes.
pub(crate) async fn run<S: Subscription>(
    mut subscription: S,
    mut link: watch::Receiver<State>,
    first: (Arc<Connection>, Channel, Consumer),
) {
    let mut current = Some(first);
    let mut attempt = 0;
    loop {
        // A consumer that ended with its connection waits for the next
        // connection only: the link backs off between connections, and
        // counting its losses here too would keep a consumer away for
        // seconds after each of a few quick reconnections.
        let mut with_its_connection = false;
        if let Some((conn, channel, consumer)) = current.take() {
            let since = Instant::now();
            subscription.consume(&conn, &channel, consumer).await;
            with_its_connection = !conn.status().connected();
            if since.elapsed() >= STEADY_AFTER || with_its_connection {
                attempt = 0;
            }
        }
        if !subscription.wanted() {
            debug!(target: "callme::amqp", what = %subscription.what(), "consumer ended");
            return;
        }
        if !with_its_connection {
            tokio::select! {
                _ = tokio::time::sleep(link::backoff(attempt)) => {}
                _ = subscription.gone() => return,
            }
        }
        attempt += 1;
        let mut own = subscription.own_link();
        let waited = async {
            match own.as_mut() {
                Some(own) => link::up(own).await,
                None => link::up(&mut link).await,
            }
        };
        let up = tokio::select! {
            up = waited => up,
            _ = subscription.gone() => return,
        };
        let Some(conn) = up else {
            debug!(target: "callme::amqp", what = %subscription.what(), "connection closed: consumer ended");
            subscription.closed();
            return;
        };
        match subscription.subscribe(&conn).await {
            Ok(Some((channel, consumer))) => {
                debug!(target: "callme::amqp", what = %subscription.what(), "consuming again");
                current = Some((conn, channel, consumer));
            }
            Ok(None) => return,
            Err(e) if attempt > QUIET_ATTEMPTS => {
                warn!(target: "callme::amqp", what = %subscription.what(), attempt, error = %e.chain(), "cannot consume again yet");
            }
            Err(e) => {
                debug!(target: "callme::amqp", what = %subscription.what(), attempt, error = %e.chain(), "cannot consume again yet");
            }
        }
    }
}
