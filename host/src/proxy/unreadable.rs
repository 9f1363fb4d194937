//! Replies the AMQP client cannot read: the calls waiting when one ended the proxy's connection still get their replies.
//!
//! Anyone who may publish to the proxy's reply exchange (every server it
//! calls learns its name) can send it a message lapin cannot read (see
//! [`crate::amqp::unreadable`]), and that ends the proxy's connection. The
//! reply queue outlives its connection (durable, deleted by the broker
//! once nobody has used it for [`super::replies::REPLY_QUEUE_EXPIRES`]),
//! so the calls waiting for replies to it then go on waiting, and
//! [`drain`] hands them the replies that reach it: it takes them with
//! `basic.get` and `no-ack` on a connection of its own (`callme drain`),
//! there to be lost. Taken with `no-ack`, the unreadable reply is gone
//! from the queue even though it ends that connection; the next one takes
//! the replies behind it. The proxy itself goes on under new names, so a
//! sender that keeps writing to the old ones costs only that connection.
//!
//! What it costs the other calls: the time to connect again, and a reply
//! taken a little later (the queue is asked again 10 ms after it was
//! found empty, then less often, down to twice a second). What it does
//! not save: the call whose reply was the unreadable one waits out its
//! timeout (the reply cannot be read, so not told to its call); and a
//! call whose request was on its way to the broker (not yet confirmed)
//! when the connection ended fails as with any other loss of the
//! connection (sent again with [`super::CallOptions::retry`], under the
//! new names). At most [`MAX_DRAINS`] queues of a proxy are drained at
//! once, each until [`MAX_LOST`] of its connections were lost to
//! unreadable replies: past either, the calls waiting fail as for any
//! other loss, so a sender of such replies cannot make a proxy hold more
//! connections than that.

use std::sync::Arc;
use std::time::Duration;

use lapin::Connection;
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, warn};

use super::pending::Pending;
use super::replies::take;
use crate::Error;
use crate::amqp::ConnectOptions;
use crate::amqp::connect::classify_lapin;
use crate::amqp::topology;
use crate::amqp::unreadable::{GET_WITHIN, Got, close, get_one};

/// Connections of one drain lost to unreadable replies, at most, before
/// the calls still waiting are failed.
const MAX_LOST: usize = 8;

/// Queues of a proxy drained at once, at most.
pub(super) const MAX_DRAINS: usize = 4;

/// Failed attempts to connect, at most, a second apart, before the calls
/// still waiting are failed.
const MAX_CONNECT_ATTEMPTS: usize = 10;

/// The first and the longest wait before asking an empty queue again.
const POLL_FIRST: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(500);

/// What became of one connection's turn at the queue.
enum Turn {
    /// No call waits any more: the queue is deleted.
    Done,
    /// An unreadable reply was taken out, with the connection.
    Unreadable,
}

/// Hands the replies that reach `queue`, the reply queue of a connection
/// lost to an unreadable reply, to the calls of `waiting` in `pending`
/// (those waiting then), until none of them waits any more; then deletes
/// the queue. If the queue is gone or the broker cannot be reached, the
/// calls still waiting fail.
pub(super) async fn drain(
    connect: ConnectOptions,
    queue: String,
    pending: Arc<Pending>,
    mut waiting: Vec<String>,
    _turn: OwnedSemaphorePermit,
) {
    let (mut lost, mut attempts) = (0, 0);
    let failed = loop {
        if !pending.still_waiting(&mut waiting, &queue) {
            break None;
        }
        let conn = match connect.connect("callme drain").await {
            Ok(conn) => conn,
            // A refusal or a bad URI does not pass with waiting.
            Err(e @ (Error::AccessRefused(_) | Error::Config(_))) => break Some(e),
            Err(e) if attempts + 1 < MAX_CONNECT_ATTEMPTS => {
                attempts += 1;
                debug!(target: "callme::proxy", reply_queue = %queue, attempts, error = %e.chain(), "cannot connect to take the replies left yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => break Some(e),
        };
        attempts = 0;
        let turn = take_replies(&conn, &queue, &pending, &mut waiting).await;
        if matches!(turn, Ok(Turn::Done)) {
            topology::delete_reply(&conn, &queue).await;
        }
        close(&conn).await;
        match turn {
            Ok(Turn::Done) => return,
            Ok(Turn::Unreadable) => {
                lost += 1;
                warn!(target: "callme::proxy", reply_queue = %queue, "took out a reply the AMQP client cannot read from the reply queue the proxy's last connection left");
                if lost >= MAX_LOST {
                    break Some(Error::Disconnected(format!(
                        "{MAX_LOST} unreadable replies were taken out of the reply queue"
                    )));
                }
            }
            Err(e) => break Some(e),
        }
    };
    if let Some(e) = failed {
        warn!(target: "callme::proxy", reply_queue = %queue, calls = waiting.len(), error = %e.chain(), "cannot take the replies left in the reply queue: the calls waiting for them fail");
        pending.fail(&waiting, &queue);
    }
}

/// Takes replies from `queue` on `conn`, with `no-ack`, handing each to
/// its call, until none of `waiting` waits any more, or one cannot be
/// read.
async fn take_replies(
    conn: &Connection,
    queue: &str,
    pending: &Pending,
    waiting: &mut Vec<String>,
) -> Result<Turn, Error> {
    let mut events = Box::pin(conn.events_listener());
    let channel = tokio::time::timeout(GET_WITHIN, conn.create_channel())
        .await
        .map_err(|_| Error::Disconnected("the broker did not open a channel in time".into()))?
        .map_err(classify_lapin)?;
    let mut pause = POLL_FIRST;
    while pending.still_waiting(waiting, queue) {
        match get_one(&channel, &mut events, queue, true).await? {
            Got::Message(message) => {
                take(pending, message.delivery);
                pause = POLL_FIRST;
            }
            Got::Empty => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(POLL_MAX);
            }
            Got::Unreadable => return Ok(Turn::Unreadable),
        }
    }
    Ok(Turn::Done)
}
