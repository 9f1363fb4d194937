//! Messages the AMQP client cannot read: telling a connection lost to one from other losses, and taking one from a queue one at a time.
//!
//! lapin 4.12 (amq-protocol 10) reads AMQP short strings (`message_id`,
//! `correlation_id`, `app_id`, a header's name, ...) as UTF-8 and fails the
//! whole connection when one is not; RabbitMQ (3.x and 4.x) passes such
//! bytes through as it got them. lapin also fails the connection on a
//! frame over its `frame_max`, and RabbitMQ takes a publisher's frame up
//! to 8 bytes over it (and may add headers of its own on the way). So one
//! message, published by anyone who may write to a queue, ends the
//! connection of whoever consumes it, and comes back to it (unacked) when
//! it consumes again.
//!
//! Whoever consumes such a queue (a server id's request queue, see
//! `server::unreadable`; a proxy's reply queue, see `proxy::unreadable`)
//! takes the message out with `basic.get` on a connection of its own,
//! there to be lost: taken with `no-ack`, the broker forgets the message
//! as it hands it over, even though it ends that connection.

use std::time::Duration;

use futures_util::{Stream, StreamExt};
use lapin::message::BasicGetMessage;
use lapin::options::BasicGetOptions;
use lapin::protocol::{AMQPErrorKind, AMQPHardError};
use lapin::{Channel, Connection, Event};

use super::connect::classify_lapin;
use super::link::CLOSE_TIMEOUT;

/// Whether `e` says the connection could not be read: a frame lapin
/// could not parse, or one over the connection's `frame_max`, which lapin
/// refuses (closing the connection with `FRAME_ERROR`, "frame too large")
/// while RabbitMQ (3.x and 4.x, `rabbit_reader`) takes a publisher's
/// frame up to 8 bytes over it and may pass on a content header grown by
/// headers it adds itself (a quorum queue's `x-delivery-count`). A
/// `FRAME_ERROR` the broker sends has its own words, not lapin's.
pub(crate) fn is_unreadable(e: &lapin::Error) -> bool {
    match e.kind() {
        lapin::ErrorKind::ParsingError(_) => true,
        lapin::ErrorKind::ProtocolError(amqp) => {
            matches!(amqp.kind(), AMQPErrorKind::Hard(AMQPHardError::FRAMEERROR))
                && amqp.get_message().as_str().starts_with("frame too large")
        }
        _ => false,
    }
}

/// What one `basic.get` brought.
pub(crate) enum Got {
    Message(Box<BasicGetMessage>),
    Empty,
    /// The connection failed to read it.
    Unreadable,
}

/// How long one `basic.get` may take.
pub(crate) const GET_WITHIN: Duration = Duration::from_secs(5);

/// One `basic.get` from `queue` on `channel`, whose connection's events
/// are `events`. A message lapin cannot read fails the connection; the
/// get itself may then never answer, so the events are watched beside it.
///
/// # Errors
///
/// A broker error other than the connection failing to read the message,
/// or no answer within [`GET_WITHIN`].
pub(crate) async fn get_one(
    channel: &Channel,
    events: &mut (impl Stream<Item = Event> + Unpin),
    queue: &str,
    no_ack: bool,
) -> Result<Got, crate::Error> {
    let get = channel.basic_get(queue.into(), BasicGetOptions { no_ack });
    let watched = async {
        tokio::pin!(get);
        loop {
            tokio::select! {
                got = &mut get => return match got {
                    Ok(Some(message)) => Ok(Got::Message(Box::new(message))),
                    Ok(None) => Ok(Got::Empty),
                    Err(e) if is_unreadable(&e) => Ok(Got::Unreadable),
                    Err(e) => Err(classify_lapin(e)),
                },
                event = events.next() => match event {
                    Some(Event::Error(e)) if is_unreadable(&e) => return Ok(Got::Unreadable),
                    Some(Event::Error(e)) => return Err(classify_lapin(e)),
                    Some(_) => {}
                    None => {
                        return Err(crate::Error::Disconnected(
                            "the connection ended".into(),
                        ));
                    }
                },
            }
        }
    };
    tokio::time::timeout(GET_WITHIN, watched)
        .await
        .unwrap_or_else(|_| {
            Err(crate::Error::Disconnected(
                "the broker did not answer in time".into(),
            ))
        })
}

/// Closes `conn` if it is still open, giving up after a while.
pub(crate) async fn close(conn: &Connection) {
    if conn.status().connected() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(200, "done".into())).await;
    }
}
