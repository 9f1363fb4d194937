"""Replies the AMQP library cannot read: the calls waiting when one ended the proxy's connection still get their replies.

Anyone who may publish to the proxy's reply exchange (every server it
calls learns its name) can send it a message aiormq cannot read (a short
string that is not UTF-8, which the broker passes on as it got it), and
that ends the proxy's connection. The reply queue outlives its connection
(durable, deleted by the broker once nobody has used it for
:data:`~callme_client.link.REPLY_QUEUE_EXPIRES`), so the calls waiting
for replies to it then go on waiting, and :func:`drain` hands them the
replies that reach it: it takes them with ``basic.get`` and ``no-ack`` on
a connection of its own (``callme drain``), there to be lost. Taken with
``no-ack``, the unreadable reply is gone from the queue even though it
ends that connection; the next one takes the replies behind it. The proxy
itself goes on under new names, so a sender that keeps writing to the old
ones costs only that connection. The Rust proxy does the same.

What it costs the other calls: the time to connect again, and a reply
taken a little later (the queue is asked again 10 ms after it was found
empty, then less often, down to twice a second). What it does not save:
the call whose reply was the unreadable one waits out its timeout (the
reply cannot be read, so not told to its call); and a call whose request
was on its way to the broker when the connection ended fails as with any
other loss. At most :data:`MAX_DRAINS` queues of a proxy are drained at
once, each until :data:`MAX_LOST` of its connections were lost to
unreadable replies: past either, the calls waiting fail as for any other
loss, so a sender of such replies cannot make a proxy hold more
connections than that.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, List, Set

import aiormq.exceptions
from aio_pika.abc import AbstractConnection

from . import errors
from .link import (
    CONNECT_TIMEOUT,
    LAST_DECLARED,
    _by,
    _close_quietly,
    _QueueDeclare,
    delete_queue,
    is_unreadable,
    open_connection,
    aiormq_connection,
    seen,
)
from .options import ConnectOptions
from .pending import LOST, Pending

__all__ = ["drain", "MAX_DRAINS"]

log = logging.getLogger("callme.proxy")

#: Connections of one drain lost to unreadable replies, at most, before
#: the calls still waiting are failed.
MAX_LOST = 8

#: Queues of a proxy drained at once, at most.
MAX_DRAINS = 4

#: Failed attempts to connect, at most, a second apart, before the calls
#: still waiting are failed.
MAX_CONNECT_ATTEMPTS = 10

#: The first and the longest wait (seconds) before asking an empty queue
#: again.
POLL_FIRST = 0.01
POLL_MAX = 0.5

#: How long one ``basic.get`` may take (seconds).
GET_WITHIN = 5.0


class _Unreadable(Exception):
    """A reply taken out of the queue ended the connection."""


async def drain(
    options: ConnectOptions,
    queue: str,
    pending: Pending,
    calls: Set[str],
) -> None:
    """Hands the replies that reach ``queue``, the reply queue of a
    connection lost to an unreadable reply, to ``calls`` (those waiting
    for it then) in ``pending``, until none of them waits any more;
    then deletes the queue. If the queue is gone or the broker cannot be
    reached, the calls still waiting fail."""
    lost = attempts = 0
    failure: "Exception | None" = None
    while pending.still_waiting(calls, queue):
        try:
            connection = await open_connection(
                options, options.handshake_timeout(CONNECT_TIMEOUT), "callme drain"
            )
        except errors.AccessRefused as e:
            failure = e  # does not pass with waiting
            break
        except errors.ConnectionError as e:
            attempts += 1
            if attempts >= MAX_CONNECT_ATTEMPTS:
                failure = e
                break
            log.debug("cannot connect to take the replies left in %s yet: %s", queue, e)
            await asyncio.sleep(1.0)
            continue
        attempts = 0
        try:
            await _take(connection, queue, pending, calls)
            await delete_queue(connection, queue)
            return
        except _Unreadable:
            lost += 1
            log.warning(
                "took out a reply the AMQP library cannot read from the reply queue %s "
                "the proxy's last connection left", queue
            )
            if lost >= MAX_LOST:
                failure = errors.ConnectionError(
                    f"{MAX_LOST} unreadable replies were taken out of the reply queue"
                )
                break
        except errors.CallmeError as e:
            failure = e
            break
        finally:
            await _close_quietly(connection)
    else:
        # Nobody waits any more (they timed out, or the proxy closed).
        return
    log.warning(
        "cannot take the replies left in the reply queue %s: the %d calls waiting for them fail: %s",
        queue, len(calls), failure,
    )
    pending.fail(
        f"{LOST}, and its reply queue could not be read: {failure}",
        queue,
        calls,
    )


async def _take(
    connection: AbstractConnection,
    queue: str,
    pending: Pending,
    calls: Set[str],
) -> None:
    """Takes replies from ``queue`` with ``no-ack``, handing each to its
    call in ``pending``, until none of ``calls`` waits any more.

    :raises _Unreadable: one could not be read, and ended ``connection``.
    :raises ConnectionError: the queue is gone, or the broker went away.
    """
    reasons: List[Any] = []
    connection.close_callbacks.add(lambda *args: reasons.extend(args[1:]))
    loop = asyncio.get_running_loop()
    pause = POLL_FIRST
    underlay: Any = None
    try:
        channel = await _by(loop.time() + GET_WITHIN, connection.channel(publisher_confirms=False))
        underlay = await channel.get_underlay_channel()
        # Declared (passively: it fails if the queue is gone) so as to be
        # read by the empty name, whatever its own (see link._QueueDeclare).
        await _by(loop.time() + GET_WITHIN, underlay.rpc(_QueueDeclare(queue=queue, passive=True)))
        while pending.still_waiting(calls, queue):
            message = await _by(
                loop.time() + GET_WITHIN, underlay.basic_get(LAST_DECLARED, no_ack=True)
            )
            if message.delivery_tag is None:  # Basic.GetEmpty
                await asyncio.sleep(pause)
                pause = min(pause * 2, POLL_MAX)
                continue
            correlation_id = message.header.properties.correlation_id
            if correlation_id is not None:
                pending.reply(correlation_id, message.body)
            pause = POLL_FIRST
    except asyncio.TimeoutError:
        raise errors.ConnectionError(
            f"the broker did not answer within {GET_WITHIN:g} s while the reply queue {queue!r} "
            "was read"
        ) from None
    except Exception as e:
        # aiormq 6 raises the reader's own error here (pamqp 3's
        # UnicodeDecodeError), aiormq 7 a closed channel's: the
        # connection is closed, and calls back, a moment after the
        # reader gave up, so the reader's error is looked at too.
        await asyncio.sleep(0)
        if is_unreadable(e) or any(is_unreadable(r) for r in reasons) or _reader_failed(connection):
            raise _Unreadable() from None
        if isinstance(e, aiormq.exceptions.ChannelNotFoundEntity):
            raise errors.ConnectionError(f"the reply queue {queue!r} is gone") from None
        raise errors.ConnectionError(
            f"lost the connection while the reply queue {queue!r} was read: {errors.reply_text(e)}"
        ) from None
    finally:
        # aiormq 6 leaves the future its `basic_get` would have read the
        # message from behind when the get does not end well (a failed
        # request, a time limit, a cancel), to be failed with the
        # connection and never looked at: taken as seen, or asyncio
        # reports it. (aiormq 7 cancels and forgets it itself.)
        getter = getattr(underlay, "getter", None)
        if asyncio.isfuture(getter):
            getter.add_done_callback(seen)


def _reader_failed(connection: AbstractConnection) -> bool:
    """Whether aiormq's reader of ``connection`` ended on a frame it could
    not read."""
    reader = getattr(aiormq_connection(connection), "_reader_task", None)
    if not isinstance(reader, asyncio.Future) or not reader.done() or reader.cancelled():
        return False
    return is_unreadable(reader.exception())
