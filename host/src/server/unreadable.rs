//! Requests the AMQP client cannot read: found in a served id's queue and taken out of it, so they do not take the host's connection down again and again.
//!
//! One request the AMQP client cannot read (see [`crate::amqp::unreadable`]),
//! published by any caller allowed to call the id, is delivered to the
//! host, kills its connection (every id it serves, every call in flight
//! given back to its queue), is given back unacked, and is delivered again
//! when the host has reconnected: a loop with no end.
//!
//! So when a consumer ends because its connection could not be read, the
//! id's consume loop asks whether any request waits in its queue
//! ([`waiting`], on the connection it consumes on: an idle id's queue
//! cannot hold it, and opens nothing), and if one does calls [`take_out`]
//! before it consumes again, on a connection of its own that is there to
//! be lost (four ids of the process at a time):
//!
//! 1. it looks, if the queue holds any request waiting (a passive
//!    declare says how many; an idle id's queue cannot hold it): `basic.get`
//!    without acks, the first requests (twice the
//!    id's prefetch, and 16 more: [`look_ahead`]) held unacked (they go back to the queue, in their order,
//!    when that connection closes). If none of them kills the
//!    connection, the request was in another id's queue, and nothing
//!    moved here;
//! 2. if one did, it takes the requests before it again, publishing each
//!    back to the id's exchange and acking it once that is confirmed (its
//!    copy waits at the end of the queue, its delivery count started
//!    anew); one the broker will not take back (a queue at a
//!    `reject-publish` length limit) is held unacked instead, and goes
//!    back to the queue as the connection closes. Then the unreadable one
//!    is taken with `no-ack` (the broker forgets a request as it hands it
//!    over): it is gone from the queue even though it ends that connection.
//!
//! This is repeated while the first requests hold another unreadable
//! one (up to 64): a caller who sent many at once costs the host's
//! connection once. (The id is then consumed on a connection of its own,
//! see [`super::consumer`].)
//!
//! What this costs: the requests ahead of it move to the back of the queue
//! (callme does not order requests), without the `user_id` their callers
//! may have set (the broker takes it only from that user); a quorum queue
//! counts each request looked at as delivered once more (this host does
//! not hold that against it, see [`super::given_back`]), and one held in
//! the second look once more; one taken where the unreadable one was
//! expected (another host consumed ahead of this one in the moment
//! between the two looks) is lost if putting it back is refused (logged).
//! Only after a connection was lost to an unreadable message.

use lapin::options::{
    BasicAckOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tracing::{debug, error, info, warn};

use super::given_back::GivenBack;
use crate::amqp::ConnectOptions;
use crate::amqp::connect::{classify_lapin, is_not_found};
pub(super) use crate::amqp::unreadable::is_unreadable;
use crate::amqp::unreadable::{GET_WITHIN, Got, close, get_one};
use crate::protocol::{server_exchange, server_queue};

/// Requests looked at, and at most taken out and put back, per id: an
/// unreadable one is among those the host's consumer had just been given
/// (its prefetch, at most 65,535).
pub(super) fn look_ahead(prefetch: usize) -> usize {
    prefetch.saturating_mul(2).saturating_add(16)
}

/// What [`take_out`] did: how many unreadable requests it took out, and
/// whether it found one at all (one it could not take out, the look's
/// connection refused or another host taking requests between the looks,
/// still holds the id's queue).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Looked {
    /// Unreadable requests taken out.
    pub(super) removed: usize,
    /// Whether an unreadable request was found.
    pub(super) found: bool,
}

/// What one look found.
#[derive(Debug, PartialEq, Eq)]
enum TakenOut {
    /// No request among the first ones looked at could not be read.
    Nothing,
    /// The unreadable request is gone; `moved` requests ahead of it were
    /// put back at the end of the queue (any others went back in place).
    Removed { moved: usize },
    /// It was not found the second time (another host took requests in
    /// between); `moved` were put back.
    Missed { moved: usize },
}

/// Most unreadable requests taken out in one go: a caller who sent many
/// at once costs the host's connection once, not once each.
const MAX_TAKEN_OUT: usize = 64;

/// Looks for an unreadable request the process makes at once, each on
/// connections of its own: every consumer of a connection lost to one is
/// told so, and a host of hundreds of busy ids would otherwise open
/// hundreds of connections in one burst. A permit is held for one look,
/// so an id taking out many takes its turn between looks with the others.
static LOOKS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// How many requests wait in `id`'s queue, asked on `conn` (the server's
/// connection, made again): an idle id's queue cannot hold the request
/// that took the connection down, and is not looked at, so the ids of a
/// lost connection that were idle open no connection to look.
///
/// A queue that is gone (it expired while the connection was down, or
/// another host of the id or an operator deleted it) holds no request:
/// 0, and subscribing declares it again.
///
/// # Errors
///
/// When the broker cannot say (the connection lost).
pub(super) async fn waiting(conn: &Connection, id: &str) -> Result<u32, crate::Error> {
    let channel = conn.create_channel().await.map_err(classify_lapin)?;
    let waiting = match waiting_on(&channel, id).await {
        Err(crate::Error::Connection(e)) if is_not_found(&e) => Ok(0),
        other => other,
    };
    if channel.status().connected() {
        crate::amqp::topology::close_soon(channel);
    }
    waiting
}

/// How many requests wait in `id`'s queue, asked on `channel` (a passive
/// declare, which closes the channel if the queue is gone).
async fn waiting_on(channel: &Channel, id: &str) -> Result<u32, crate::Error> {
    let queue = channel
        .queue_declare(
            server_queue(id).as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(classify_lapin)?;
    Ok(queue.message_count())
}

/// Looks at the first `look` requests of `id`'s queue and takes out those
/// that cannot be read, one at a time, until none is left among them or
/// [`MAX_TAKEN_OUT`] are gone (see the module's docs).
///
/// # Errors
///
/// A broker error other than the connection failing to read a request,
/// before any was found.
pub(super) async fn take_out(
    connect: &ConnectOptions,
    id: &str,
    look: usize,
    given_back: &GivenBack,
) -> Result<Looked, crate::Error> {
    let mut removed = 0;
    let mut found = false;
    while removed < MAX_TAKEN_OUT {
        // A turn a look, not one for all of them: the permits are handed
        // out in turn, so other ids, which must look once before they
        // consume again, wait for a few looks, not a few ids' 64.
        let turn = LOOKS
            .acquire()
            .await
            .map_err(|_| crate::Error::Disconnected("the server is closing".into()))?;
        let looked = take_out_one(connect, id, look, given_back).await;
        drop(turn);
        match looked {
            Ok(TakenOut::Removed { .. }) => {
                removed += 1;
                found = true;
            }
            Ok(TakenOut::Missed { .. }) => {
                found = true;
                break;
            }
            Ok(TakenOut::Nothing) => break,
            // What was taken out is gone all the same.
            Err(e) if found => {
                warn!(target: "callme::server", server_id = id, removed, error = %e, "stopped taking out unreadable requests");
                break;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Looked { removed, found })
}

/// Looks at the first `look` requests of `id`'s queue and takes out the
/// first one that cannot be read.
async fn take_out_one(
    connect: &ConnectOptions,
    id: &str,
    look: usize,
    given_back: &GivenBack,
) -> Result<TakenOut, crate::Error> {
    let Some(ahead) = unreadable_within(connect, id, look, given_back).await? else {
        return Ok(TakenOut::Nothing);
    };
    // Found: whatever happens to the taking, it was there (the id moves).
    let taken = match connect.connect("callme unreadable request").await {
        Ok(conn) => {
            let taken = take_until_unreadable(&conn, id, ahead, look, given_back).await;
            close(&conn).await;
            taken
        }
        Err(e) => Err(e),
    };
    let outcome = taken.unwrap_or_else(|e| {
        warn!(target: "callme::server", server_id = id, error = %e, "cannot take out an unreadable request found");
        TakenOut::Missed { moved: 0 }
    });
    match &outcome {
        TakenOut::Removed { moved } => {
            warn!(target: "callme::server", server_id = id, moved, "removed a request the AMQP client cannot read (a short string that is not UTF-8, or a header over the frame size): it had closed the host's connection")
        }
        TakenOut::Missed { moved } => {
            info!(target: "callme::server", server_id = id, moved, "an unreadable request was not found again")
        }
        TakenOut::Nothing => {}
    }
    Ok(outcome)
}

/// How many requests are ahead of the first of the first `look` requests
/// of `id`'s queue that cannot be read, if one cannot: they are taken
/// unacked, and all go back when the connection closes (or is lost to the
/// unreadable one), noted in `given_back`.
async fn unreadable_within(
    connect: &ConnectOptions,
    id: &str,
    look: usize,
    given_back: &GivenBack,
) -> Result<Option<usize>, crate::Error> {
    let conn = connect.connect("callme request check").await?;
    let mut events = Box::pin(conn.events_listener());
    let mut looked_at = Vec::new();
    let looked = async {
        let channel = conn.create_channel().await.map_err(classify_lapin)?;
        // Every consumer of a lost connection is told it could not be
        // read. A queue with no request waiting cannot hold the one that
        // killed it: an idle id need not look. (A busy one looks: its
        // requests given back by the lost connection are waiting.)
        let waiting = waiting_on(&channel, id).await?;
        if waiting == 0 {
            debug!(target: "callme::server", server_id = id, "no request waiting: not looked at for one the AMQP client cannot read");
            return Ok(None);
        }
        debug!(target: "callme::server", server_id = id, waiting, "looking for a request the AMQP client cannot read");
        for ahead in 0..look {
            match get_one(&channel, &mut events, &server_queue(id), false).await? {
                // Held unacked until the connection closes.
                Got::Message(held) => {
                    let props = &held.delivery.properties;
                    if let (Some(reply_to), Some(corr)) = (props.reply_to(), props.correlation_id())
                    {
                        looked_at.push(given_back.key(id, reply_to.as_str(), corr.as_str()));
                    }
                }
                Got::Empty => return Ok(None),
                Got::Unreadable => return Ok(Some(ahead)),
            }
        }
        Ok(None)
    };
    let found = looked.await;
    close(&conn).await;
    given_back.note(looked_at);
    found
}

/// Takes requests of `id` until the one that cannot be read: each of the
/// `ahead` found before it is published back by the id's exchange and,
/// once that is confirmed, acked (a copy of it waits at the end of the
/// queue, its delivery count started anew); one the broker will not take
/// back (a queue at a `reject-publish` length limit) is held unacked, and
/// goes back to the queue as the connection closes, noted in
/// `given_back`. Then the unreadable one is taken with `no-ack`: gone,
/// though it ends the connection. One found in its place that can be read
/// (another host took requests between the two looks) was taken for good,
/// and is published back as the others are; it is lost if that is refused.
async fn take_until_unreadable(
    conn: &Connection,
    id: &str,
    ahead: usize,
    look: usize,
    given_back: &GivenBack,
) -> Result<TakenOut, crate::Error> {
    let mut events = Box::pin(conn.events_listener());
    let taking = conn.create_channel().await.map_err(classify_lapin)?;
    let back = conn.create_channel().await.map_err(classify_lapin)?;
    back.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(classify_lapin)?;
    // Refused once, the rest are held: publishing more would meet the
    // same refusal, on a channel it may have closed.
    let mut publishing = true;
    let mut held = Vec::new();
    let mut moved = 0;
    let mut outcome = Ok(TakenOut::Missed { moved });
    for i in 0..look {
        let hold = i < ahead;
        let got = match get_one(&taking, &mut events, &server_queue(id), !hold).await {
            Ok(got) => got,
            Err(e) => {
                outcome = Err(e);
                break;
            }
        };
        match got {
            Got::Message(message) => {
                let delivery = &message.delivery;
                let props = &delivery.properties;
                let put = if publishing {
                    put_back(&back, id, &delivery.data, props).await
                } else {
                    Err("an earlier one was refused".to_string())
                };
                match put {
                    Ok(()) => {
                        moved += 1;
                        if hold
                            && let Err(e) = taking
                                .basic_ack(delivery.delivery_tag, BasicAckOptions::default())
                                .await
                        {
                            outcome = Err(classify_lapin(e));
                            break;
                        }
                    }
                    Err(e) if hold => {
                        if publishing {
                            warn!(target: "callme::server", server_id = id, error = %e, "a request ahead of an unreadable one could not be put back: it and those after it are held, and go back to the queue");
                        }
                        publishing = false;
                        if let (Some(reply_to), Some(corr)) =
                            (props.reply_to(), props.correlation_id())
                        {
                            held.push(given_back.key(id, reply_to.as_str(), corr.as_str()));
                        }
                    }
                    Err(e) => {
                        error!(target: "callme::server", server_id = id, error = %e, "a request taken where an unreadable one was could not be put back: it is lost");
                        break;
                    }
                }
                outcome = Ok(TakenOut::Missed { moved });
            }
            Got::Empty => break,
            // Taken with `no-ack`, it is gone; held, it goes back (it
            // moved up: another host took requests ahead of it).
            Got::Unreadable if !hold => {
                outcome = Ok(TakenOut::Removed { moved });
                break;
            }
            Got::Unreadable => break,
        }
    }
    given_back.note(held);
    outcome
}

/// `properties` without `user_id`: RabbitMQ checks it against the user
/// that publishes (its "Validated User-ID" guide, 3.x and 4.x), so a
/// caller naming its own user there would have the host's publish of it
/// refused, and the channel it came on closed. Everything else is kept.
fn as_put_back(properties: &BasicProperties) -> BasicProperties {
    let p = properties;
    let mut out = BasicProperties::default();
    macro_rules! keep {
        ($($get:ident => $set:ident),* $(,)?) => {
            $(if let Some(value) = p.$get() {
                out = out.$set(value.clone());
            })*
        };
    }
    keep!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        expiration => with_expiration,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    out
}

/// Publishes a request back to `id`'s exchange, confirmed, with its
/// properties as its caller sent them but for `user_id` ([`as_put_back`]).
async fn put_back(
    channel: &Channel,
    id: &str,
    body: &[u8],
    properties: &lapin::BasicProperties,
) -> Result<(), String> {
    let confirmed = channel
        .basic_publish(
            server_exchange(id).as_str().into(),
            "".into(),
            BasicPublishOptions::default(),
            body,
            as_put_back(properties),
        )
        .await
        .map_err(|e| e.to_string())?;
    // A broker that holds publishes back (a memory or disk alarm) would
    // otherwise keep the id from being consumed at all.
    let confirm = tokio::time::timeout(GET_WITHIN, confirmed)
        .await
        .map_err(|_| format!("no confirm within {GET_WITHIN:?}"))?
        .map_err(|e| e.to_string())?;
    match confirm {
        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(()),
        Confirmation::Nack(_) => Err("the broker refused it (negative confirm)".into()),
    }
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, FieldTable};

    use super::*;

    /// A request is put back with every property its caller gave but
    /// `user_id`.
    #[test]
    fn a_request_put_back_keeps_its_properties_but_its_user() {
        let mut headers = FieldTable::default();
        headers.insert("x-callme-depth".into(), AMQPValue::LongUInt(2));
        let full = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_content_encoding("identity".into())
            .with_headers(headers)
            .with_delivery_mode(2)
            .with_priority(3)
            .with_correlation_id("c".into())
            .with_reply_to("r".into())
            .with_expiration("1000".into())
            .with_message_id("m".into())
            .with_timestamp(42)
            .with_type("t".into())
            .with_app_id("a".into())
            .with_cluster_id("k".into());
        let with_user = full.clone().with_user_id("olivia".into());
        assert_eq!(as_put_back(&with_user), full);
        assert_eq!(
            as_put_back(&BasicProperties::default()),
            BasicProperties::default()
        );
    }
}
