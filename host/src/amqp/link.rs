//! A broker connection that replaces itself when lost: callme's own reconnection.
//!
//! A [`Link`] owns one AMQP connection at a time. A supervisor task watches
//! it; when it is lost (the broker restarted, closed it, or the network
//! failed) the link says so at once ([`State::Down`]) and connects again
//! with exponential backoff until it succeeds. Whoever uses the link
//! (server consumers, proxy reply consumers) subscribes to its [`State`]
//! and re-declares what it needs on each new connection.
//!
//! A new connection is made from scratch rather than recovered in place:
//! lapin's automatic recovery can wait forever after a broker restart
//! without telling the consumers. Without `auto_recover` a lost connection
//! is final ([`State::Closed`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::Connection;
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::connect::ConnectOptions;
use crate::Error;

/// Where a link stands.
#[derive(Clone)]
pub(crate) enum State {
    /// Connected.
    Up(Arc<Connection>),
    /// Lost; reconnecting.
    Down,
    /// Closed for good: by its owner, or lost without `auto_recover`.
    Closed,
}

/// First wait between reconnection attempts; it doubles up to
/// [`BACKOFF_MAX`].
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);

/// A broker that does not confirm a close or a cancel within this time is
/// left.
pub(crate) const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the connection's status is looked at, beside its events.
const POLL_EVERY: Duration = Duration::from_millis(250);

/// How long the link may be down before that is logged as an error.
const DOWN_REPORT_AFTER: Duration = Duration::from_secs(30);

/// A connection lost sooner than this after it was opened counts as a
/// failed attempt: the next is made after a backoff, not at once.
const SHORT_LIVED: Duration = Duration::from_millis(250);

/// The owner's handle: dropping it closes the connection.
pub(crate) struct Link {
    state: watch::Receiver<State>,
    /// Told to stop by `close`; dropped, it stops the supervisor too.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    stop: watch::Sender<bool>,
    /// The node the first connection went to, password hidden.
    #[cfg_attr(not(feature = "server"), allow(dead_code))]
    first_node: String,
    /// How the link connects, for connections of its owner's beside it.
    options: ConnectOptions,
}

impl Link {
    /// Connects once (so a wrong URI, password or TLS file fails here, not
    /// in the background), then keeps the connection up.
    pub(crate) async fn connect(
        options: &ConnectOptions,
        name: &'static str,
    ) -> Result<Link, Error> {
        Link::connect_as(options, name, true).await
    }

    /// As [`Link::connect`], for a connection the program can do without
    /// (the server's reply pipeline): it is not counted in the
    /// `callme_broker_connected` metric, and its being down does not make
    /// the host unready.
    #[cfg(feature = "server")]
    pub(crate) async fn connect_auxiliary(
        options: &ConnectOptions,
        name: &'static str,
    ) -> Result<Link, Error> {
        Link::connect_as(options, name, false).await
    }

    async fn connect_as(
        options: &ConnectOptions,
        name: &'static str,
        observed: bool,
    ) -> Result<Link, Error> {
        let (conn, broker) = options.connect_from(name, 0).await?;
        let node = options.redacted_node(broker);
        debug!(target: "callme::link", connection = name, %node, "connected");
        let conn = Arc::new(conn);
        let (state_tx, state) = watch::channel(State::Up(conn.clone()));
        let (stop, stop_rx) = watch::channel(false);
        let current = Current { conn, broker };
        tokio::spawn(supervise(
            options.clone(),
            name,
            observed,
            current,
            state_tx,
            stop_rx,
        ));
        Ok(Link {
            state,
            stop,
            first_node: node,
            options: options.clone(),
        })
    }

    /// The broker node of the list the first connection went to, password
    /// hidden (a reconnection may go to another; the link logs it).
    #[cfg(feature = "server")]
    pub(crate) fn first_node(&self) -> &str {
        &self.first_node
    }

    /// How the link connects: for a connection of its own beside the
    /// link's, there to be lost (`proxy::unreadable`).
    pub(crate) fn options(&self) -> &ConnectOptions {
        &self.options
    }

    /// The connection, if it is up now.
    pub(crate) fn current(&self) -> Option<Arc<Connection>> {
        match &*self.state.borrow() {
            State::Up(conn) => Some(conn.clone()),
            State::Down | State::Closed => None,
        }
    }

    /// Whether the link is closed for good.
    pub(crate) fn is_closed(&self) -> bool {
        matches!(&*self.state.borrow(), State::Closed)
    }

    /// Follows the link's state.
    pub(crate) fn subscribe(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// Closes the connection and stops reconnecting.
    pub(crate) async fn close(&self) {
        let _ = self.stop.send(true);
        self.closed().await;
    }

    /// Resolves when the link is closed for good.
    pub(crate) async fn closed(&self) {
        let mut state = self.state.clone();
        let _ = state.wait_for(|s| matches!(s, State::Closed)).await;
    }
}

/// Waits until the link is up, and returns its connection; `None` once it
/// is closed for good.
pub(crate) async fn up(state: &mut watch::Receiver<State>) -> Option<Arc<Connection>> {
    let seen = state
        .wait_for(|s| !matches!(s, State::Down))
        .await
        .ok()?
        .clone();
    match seen {
        State::Up(conn) => Some(conn),
        State::Down | State::Closed => None,
    }
}

/// The next wait of an exponential backoff with some jitter, so hosts that
/// lost the same broker do not all come back in the same instant.
pub(crate) fn backoff(attempt: u32) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let base = BACKOFF_START
        .saturating_mul(1 << attempt.min(16))
        .min(BACKOFF_MAX);
    let jitter = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        % (base.as_millis() as u64 / 4 + 1);
    base + Duration::from_millis(jitter)
}

/// The connection a link holds, and which broker of the list it is to.
struct Current {
    conn: Arc<Connection>,
    broker: usize,
}

async fn supervise(
    options: ConnectOptions,
    name: &'static str,
    observed: bool,
    current: Current,
    state: watch::Sender<State>,
    mut stop: watch::Receiver<bool>,
) {
    let broker = options.redacted();
    let Current {
        mut conn,
        broker: mut node,
    } = current;
    #[cfg(feature = "server")]
    let mut observed = observed.then(|| crate::observe::LinkWatch::up(name));
    #[cfg(not(feature = "server"))]
    let _ = observed;
    let mut opened = Instant::now();
    // Connections in a row lost as soon as they were opened.
    let mut brief = 0u32;
    loop {
        let lost = tokio::select! {
            lost = lost(&conn) => Some(lost),
            _ = stop.wait_for(|s| *s) => None,
        };
        let Some((why, unreadable)) = lost else {
            let close = conn.close(200, "closed".into());
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
            state.send_replace(State::Closed);
            return;
        };
        let _ = state.send_replace(State::Down);
        #[cfg(feature = "server")]
        if let Some(observed) = observed.as_mut() {
            observed.down();
        }
        if !options.auto_recover {
            warn!(target: "callme::link", connection = name, %broker, reason = %why, "lost the broker");
            state.send_replace(State::Closed);
            return;
        }
        let lost_node = options.redacted_node(node);
        warn!(target: "callme::link", connection = name, %broker, node = %lost_node, reason = %why, "lost the broker: reconnecting");
        let down_since = Instant::now();
        let mut reported = false;
        let mut attempt = 0;
        // A broker (or a balancer in front of it) that closes each
        // connection as soon as it is open, as a node being drained may,
        // is not reconnected to at the rate of handshakes: such losses
        // back off as failed attempts do, until a connection lasts. A loss
        // to a message the connection could not read is not one of them:
        // whoever consumes looks for that message as soon as it is back.
        if opened.elapsed() < SHORT_LIVED && !unreadable {
            brief += 1;
            debug!(target: "callme::link", connection = name, %broker, lived = ?opened.elapsed(), "the connection was lost as soon as it was open: waiting before the next");
            tokio::select! {
                _ = tokio::time::sleep(backoff(brief - 1)) => {}
                _ = stop.wait_for(|s| *s) => {
                    state.send_replace(State::Closed);
                    return;
                }
            }
        } else {
            brief = 0;
        }
        conn = loop {
            let connect = tokio::select! {
                // The next broker of the list first: the one just lost
                // may be the one that is down.
                c = options.connect_from(name, node + 1) => c,
                _ = stop.wait_for(|s| *s) => {
                    state.send_replace(State::Closed);
                    return;
                }
            };
            match connect {
                Ok((fresh, answered)) => {
                    node = answered;
                    break Arc::new(fresh);
                }
                Err(e) => {
                    debug!(target: "callme::link", connection = name, %broker, attempt, error = %e.chain(), "reconnection failed");
                    if !reported && down_since.elapsed() >= DOWN_REPORT_AFTER {
                        error!(target: "callme::link", connection = name, %broker, down_for = ?down_since.elapsed(), error = %e.chain(), "the broker is still unreachable: nothing is served or called until it is back");
                        reported = true;
                    }
                }
            }
            let wait = backoff(attempt);
            attempt += 1;
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = stop.wait_for(|s| *s) => {
                    state.send_replace(State::Closed);
                    return;
                }
            }
        };
        opened = Instant::now();
        let reached = options.redacted_node(node);
        info!(target: "callme::link", connection = name, %broker, node = %reached, down_for = ?down_since.elapsed(), attempts = attempt + 1, "reconnected");
        state.send_replace(State::Up(conn.clone()));
        #[cfg(feature = "server")]
        if let Some(observed) = observed.as_mut() {
            observed.reconnected();
        }
    }
}

/// Resolves when `conn` is no longer usable, with the reason, and whether
/// it was a message the connection could not read
/// ([`super::unreadable::is_unreadable`]).
async fn lost(conn: &Connection) -> (String, bool) {
    let mut events = conn.events_listener();
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(lapin::Event::Error(e)) if !conn.status().connected() => {
                    return (e.to_string(), super::unreadable::is_unreadable(&e));
                }
                Some(_) => {}
                None => return ("the connection ended".into(), false),
            },
            _ = tokio::time::sleep(POLL_EVERY) => {}
        }
        if !conn.status().connected() {
            let status = conn.status();
            let state = if status.errored() {
                "failed"
            } else if status.closing() || status.closed() {
                "closed"
            } else {
                "not connected"
            };
            return (format!("the connection {state}"), false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_bounded_jitter() {
        let first = backoff(0);
        assert!(
            first >= BACKOFF_START && first <= BACKOFF_START * 5 / 4 + Duration::from_millis(1)
        );
        let late = backoff(30);
        assert!(late >= BACKOFF_MAX && late <= BACKOFF_MAX * 5 / 4 + Duration::from_millis(1));
        assert!(backoff(3) >= BACKOFF_START * 8);
    }
}
