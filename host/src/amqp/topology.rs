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
async fn declare_bound(
    channel: &Channel,
    exchange: &str,
    queue: &str,
    exchange_options: ExchangeDeclareOptions,
    queue_options: QueueDeclareOptions,
) -> Result<(), lapin::Error> {
    declare_bound_with(
        channel,
        exchange,
        queue,
        exchange_options,
        queue_options,
        FieldTable::default(),
    )
    .await
}

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
    if shape.quorum {
        arguments.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    if let Some(expires) = shape.expires {
        let millis = i64::try_from(expires.as_millis())
            .unwrap_or(i64::MAX)
            .max(1);
        arguments.insert("x-expires".into(), AMQPValue::LongLongInt(millis));
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
#[cfg(feature = "server")]
pub(crate) async fn delete_server_queue_if_idle(
    conn: &Connection,
    id: &str,
    shape: ServerQueue,
) -> bool {
    use lapin::options::QueueDeleteOptions;
    let queue = crate::protocol::server_queue(id);
    let delete = async {
        let channel = conn.create_channel().await?;
        let flags = if shape.quorum {
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
                Ok(q) if q.consumer_count() == 0 && q.message_count() == 0 => {}
                Ok(_) => {
                    close_soon(channel);
                    return Ok(false);
                }
                // Not there: nothing to delete.
                Err(e) if super::connect::is_not_found(&e) => return Ok(true),
                Err(e) => return Err(e),
            }
            QueueDeleteOptions::default()
        } else {
            QueueDeleteOptions {
                if_unused: true,
                if_empty: true,
                ..QueueDeleteOptions::default()
            }
        };
        let deleted = channel.queue_delete(queue.as_str().into(), flags).await;
        if deleted.is_ok() {
            close_soon(channel);
        }
        deleted.map(|_| true)
    };
    matches!(
        tokio::time::timeout(CLOSE_TIMEOUT, delete).await,
        Ok(Ok(true))
    )
}

/// Declares a proxy's reply exchange and queue and binds them: both go
/// away with the proxy's connection (the queue is exclusive to it).
pub(crate) async fn declare_reply(
    channel: &Channel,
    exchange: &str,
    queue: &str,
) -> Result<(), lapin::Error> {
    declare_bound(
        channel,
        exchange,
        queue,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..ExchangeDeclareOptions::default()
        },
        QueueDeclareOptions {
            auto_delete: true,
            exclusive: true,
            ..QueueDeclareOptions::default()
        },
    )
    .await
}
