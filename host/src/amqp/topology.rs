//! What callme declares on the broker: exchanges, queues and their bindings.
//!
//! Every server id and every proxy has the same shape of names: a direct
//! exchange and a queue bound to it with the routing key `""` (see
//! `protocol` for the names). Declarations made on a new connection are
//! bounded in time, so a broker that stops answering mid-declaration
//! cannot leave a consumer registered behind the caller's back.

use std::time::Duration;

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ExchangeKind};

use super::connect::classify_lapin;
use super::link::CLOSE_TIMEOUT;
use crate::Error;

/// Declaring and consuming that takes longer than this is given up (and
/// tried again, on a new connection).
const REDECLARE_TIMEOUT: Duration = Duration::from_secs(15);

/// Opens a channel on `conn` and runs `declare` on it, each within
/// [`REDECLARE_TIMEOUT`]. On a timeout the channel is closed, so nothing
/// the declarations started late (a consumer registered after all) is left
/// behind on it.
pub(crate) async fn declare_on<T>(
    conn: &Connection,
    declare: impl AsyncFnOnce(&Channel) -> Result<T, Error>,
) -> Result<(Channel, T), Error> {
    let late = || Error::Disconnected("the broker did not answer in time".into());
    let channel = tokio::time::timeout(REDECLARE_TIMEOUT, conn.create_channel())
        .await
        .map_err(|_| late())?
        .map_err(classify_lapin)?;
    match tokio::time::timeout(REDECLARE_TIMEOUT, declare(&channel)).await {
        Ok(Ok(declared)) => Ok((channel, declared)),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            close_soon(channel);
            Err(late())
        }
    }
}

/// Closes `channel` in the background, giving up after a while.
pub(crate) fn close_soon(channel: Channel) {
    tokio::spawn(async move {
        let close = channel.close(200, "closed".into());
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
    });
}

/// Declares a direct exchange and a queue bound to it with the routing key
/// `""`: the shape of every server's and every proxy's names.
async fn declare_bound_with(
    channel: &Channel,
    exchange: &str,
    queue: &str,
    exchange_options: ExchangeDeclareOptions,
    queue_options: QueueDeclareOptions,
    queue_arguments: FieldTable,
) -> Result<(), lapin::Error> {
    channel
        .exchange_declare(
            exchange.into(),
            ExchangeKind::Direct,
            exchange_options,
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_declare(queue.into(), queue_options, queue_arguments)
        .await?;
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
}

/// How a server id's queue is declared.
///
/// Server queues are durable and never auto-delete: RabbitMQ 4.x refuses
/// queues that are neither durable nor exclusive by default (the
/// deprecated feature `transient_nonexcl_queues`, RabbitMQ's "Deprecated
/// Features" guide), and a quorum queue is always durable. A queue nobody
/// consumes from goes away by itself after `expires` (`x-expires`,
/// RabbitMQ's "Time-To-Live and Expiration" guide), its exchange with it
/// (auto-delete: deleted with its last binding).
#[cfg(feature = "server")]
#[derive(Debug, Clone, Copy)]
pub(crate) struct ServerQueue {
    /// A quorum queue (replicated over a cluster) rather than a classic one.
    pub(crate) quorum: bool,
    /// Deleted after this long without consumers; `None`: kept.
    pub(crate) expires: Option<Duration>,
}

/// Declares the exchange `server_ID_ex` and queue `server_ID_queue` of a
/// server id and binds them.
#[cfg(feature = "server")]
pub(crate) async fn declare_server(
    channel: &Channel,
    id: &str,
    shape: ServerQueue,
) -> Result<(), lapin::Error> {
    use lapin::types::{AMQPValue, LongString};
    let mut arguments = FieldTable::default();
    // Named either way: a vhost whose default queue type is quorum (or
    // stream) would otherwise make a classic id's queue one (RabbitMQ's
    // "Virtual Hosts" guide, "Default Queue Type"; seen on 3.10.8), which
    // the host would then delete with `if-unused`, a connection error on
    // a quorum queue. A classic queue declared before without the argument
    // is the same queue to the broker (`x-queue-type` absent equals
    // `classic`); a quorum one made so is refused as any queue of another
    // type is, saying what differs.
    let queue_type = if shape.quorum { "quorum" } else { "classic" };
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from(queue_type)),
    );
    if let Some(expires) = shape.expires {
        arguments.insert("x-expires".into(), expires_argument(expires));
    }
    declare_bound_with(
        channel,
        &crate::protocol::server_exchange(id),
        &crate::protocol::server_queue(id),
        ExchangeDeclareOptions {
            durable: true,
            auto_delete: true,
            ..ExchangeDeclareOptions::default()
        },
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        arguments,
    )
    .await
}

/// Deletes a server id's queue if nobody consumes from it and nothing is
/// waiting in it, on a channel of its own (a refusal closes the channel
/// it came on). Whether it is gone.
///
/// A classic queue is deleted with `if-unused` and `if-empty`, so the
/// broker checks both at the moment it deletes. RabbitMQ refuses those
/// flags on a quorum queue, and not politely: `rabbit_quorum_queue:delete`
/// answers them with `not_implemented`, a connection error (540) that
/// would close every channel of the host's connection (3.8 to 4.x). So a
/// quorum queue is looked at first (a passive declare: its consumers and
/// ready messages) and deleted without flags when both are 0. A request
/// published in the moment between is lost with the queue (its caller
/// times out), and a host that began consuming in that moment has its
/// consumer cancelled and declares the queue again.
///
/// But a quorum queue's counts are not always the queue's: its leader is
/// asked with a timeout of 250 ms, and a leader that does not answer in
/// time, or none (a majority lost, an election) is reported as 0 and 0
/// (`rabbit_quorum_queue:stat/2`, 3.8 to 4.x). And a delete the queue's
/// members cannot agree on is forced: every member goes, with whatever
/// was waiting and under whichever hosts consume from it, and those are
/// not told (`rabbit_quorum_queue:delete/4`, "Attempting force delete").
/// So zeros are believed only once the leader has answered: a `basic.get`
/// goes to the leader and waits for it; if it finds nothing, the counts
/// are asked again and, still 0 and 0, the queue is deleted. A request it
/// finds is given back (`basic.nack`: RabbitMQ 4.3 and later do not count
/// it in `x-delivery-count`; earlier versions count every return, so such
/// a request comes to its next host delivered once more), and a leader
/// that does not answer within [`CLOSE_TIMEOUT`] leaves the queue where
/// it is.
#[cfg(feature = "server")]
pub(crate) async fn delete_server_queue_if_idle(
    conn: &Connection,
    id: &str,
    shape: ServerQueue,
) -> bool {
    use lapin::options::{BasicGetOptions, BasicNackOptions, QueueDeleteOptions};
    let queue = crate::protocol::server_queue(id);
    let Ok(Ok(channel)) = tokio::time::timeout(CLOSE_TIMEOUT, conn.create_channel()).await else {
        return false;
    };
    let idle = async || {
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        match declared {
            Ok(q) => Ok(Some(q.consumer_count() == 0 && q.message_count() == 0)),
            // Not there: nothing to delete.
            Err(e) if super::connect::is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    };
    let delete = async {
        let flags = if shape.quorum {
            match idle().await? {
                Some(true) => {}
                Some(false) => return Ok(false),
                None => return Ok(true),
            }
            let options = BasicGetOptions { no_ack: false };
            if let Some(waiting) = channel.basic_get(queue.as_str().into(), options).await? {
                let requeue = BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                };
                waiting.delivery.nack(requeue).await?;
                return Ok(false);
            }
            match idle().await? {
                Some(true) => {}
                Some(false) => return Ok(false),
                None => return Ok(true),
            }
            QueueDeleteOptions::default()
        } else {
            QueueDeleteOptions {
                if_unused: true,
                if_empty: true,
                ..QueueDeleteOptions::default()
            }
        };
        channel
            .queue_delete(queue.as_str().into(), flags)
            .await
            .map(|_| true)
    };
    let deleted = matches!(
        tokio::time::timeout(CLOSE_TIMEOUT, delete).await,
        Ok(Ok(true))
    );
    // Closed however it went: a `basic.get` still waiting for the leader
    // must not leave a request on a channel nobody reads.
    close_soon(channel);
    deleted
}

/// Declares a proxy's reply exchange and queue and binds them. The queue
/// outlives the proxy's connection, so that the replies on their way are
/// kept when the connection is lost to a message it could not read
/// (`proxy::unreadable`): durable (RabbitMQ 4.x refuses queues that are
/// neither durable nor exclusive by default, above), deleted by the broker
/// once unused for `expires` (`x-expires`: no consumer, no `basic.get`, no
/// declare; RabbitMQ's "Time-To-Live and Expiration" guide, 3.x and 4.x),
/// and by the proxy when it closes or names its queue anew. It is classic
/// (`x-queue-type`, "Queues" guide), whatever the vhost's default. The
/// exchange goes with it (auto-delete: deleted with its last binding).
pub(crate) async fn declare_reply(
    channel: &Channel,
    exchange: &str,
    queue: &str,
    expires: Duration,
) -> Result<(), lapin::Error> {
    use lapin::types::{AMQPValue, LongString};
    let mut arguments = FieldTable::default();
    arguments.insert("x-expires".into(), expires_argument(expires));
    // Whatever the vhost's default queue type (RabbitMQ 3.13 and 4.x): a
    // quorum queue per proxy connection would cost a Raft group, and a
    // stream takes no `x-expires`.
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("classic")),
    );
    declare_bound_with(
        channel,
        exchange,
        queue,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..ExchangeDeclareOptions::default()
        },
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        arguments,
    )
    .await
}

/// A queue's `x-expires` argument: `expires` in whole milliseconds, at
/// least 1 (the broker refuses 0).
fn expires_argument(expires: Duration) -> lapin::types::AMQPValue {
    let millis = i64::try_from(expires.as_millis())
        .unwrap_or(i64::MAX)
        .max(1);
    lapin::types::AMQPValue::LongLongInt(millis)
}

/// Deletes a proxy's reply queue (its exchange goes with it) on a channel
/// of `conn` of its own, giving up after a while: best effort, as the
/// broker deletes it anyway once unused (see [`declare_reply`]).
pub(crate) async fn delete_reply(conn: &Connection, queue: &str) {
    match tokio::time::timeout(CLOSE_TIMEOUT, conn.create_channel()).await {
        Ok(Ok(channel)) => delete_reply_on(channel, queue).await,
        Ok(Err(e)) => {
            tracing::debug!(target: "callme::proxy", queue = %queue, error = %e, "reply queue not deleted; the broker will");
        }
        Err(_) => {}
    }
}

/// [`delete_reply`] on `channel`, which it closes.
pub(crate) async fn delete_reply_on(channel: Channel, queue: &str) {
    use lapin::options::QueueDeleteOptions;
    let delete = channel.queue_delete(queue.into(), QueueDeleteOptions::default());
    if let Ok(Err(e)) = tokio::time::timeout(CLOSE_TIMEOUT, delete).await {
        tracing::debug!(target: "callme::proxy", queue = %queue, error = %e, "reply queue not deleted; the broker will");
    }
    close_soon(channel);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lapin::types::AMQPValue;

    use super::expires_argument;

    #[test]
    fn an_expiry_is_whole_milliseconds_and_never_zero() {
        let millis = |d| match expires_argument(d) {
            AMQPValue::LongLongInt(ms) => ms,
            other => panic!("not a long long: {other:?}"),
        };
        assert_eq!(millis(Duration::from_secs(30)), 30_000);
        assert_eq!(millis(Duration::from_micros(2_500)), 2);
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::MAX), i64::MAX);
    }
}
