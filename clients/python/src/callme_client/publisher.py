"""Publishing requests with confirms on a pool of channels, one request per channel at a time.

The broker answers a publish to an exchange that does not exist (a server
id nobody serves) by closing the channel it came on. On a channel shared by
every call that would fail all the other requests waiting for their
confirms on it. A :class:`Publisher` gives each request a channel of its
own, a *lane*, until its confirm is back: a refused request closes only its
own lane. Lanes are reused, so the common case costs what a shared channel
does, and their number is bounded, so a flood of requests to missing
servers cannot grow the connection's channel count. One exchange holds at
most a quarter of the lanes: a server whose queue stops confirming (a
quorum queue that lost its majority withholds confirms until it has one
again) keeps the lanes its requests took until their calls give up, and
the calls to other servers go on in the rest. The Rust proxy does the
same.
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Dict, List, Optional, Tuple

import aiormq
import aiormq.abc
import aiormq.exceptions
from aio_pika.abc import AbstractConnection

from . import errors
from .link import aiormq_connection, opened

__all__ = ["Publisher", "LANES", "NotSent"]

log = logging.getLogger("callme.proxy")

#: Requests one proxy has on their way to the broker at once (each on a
#: channel of its own until confirmed); more wait for a free lane. The Rust
#: proxy's number.
LANES = 64


class NotSent(errors.ConnectionError):
    """The connection was lost before any frame of the request was written
    to it: the request can be sent again on the next one, with nothing to
    run twice."""


class _Share:
    """One exchange's share of the lanes, while requests to it hold or wait
    for one."""

    __slots__ = ("lanes", "users")

    def __init__(self, lanes: int) -> None:
        self.lanes = asyncio.Semaphore(lanes)
        self.users = 0


class _ExchangeLane:
    """A lane of one exchange's share, held while a publish to it is under
    way (or waited for). Counted from when it is made, so a caller that
    stops waiting for it leaves nothing behind; the last one out takes the
    exchange's entry away."""

    __slots__ = ("_shares", "_exchange", "_share")

    def __init__(self, shares: Dict[str, _Share], exchange: str, lanes: int) -> None:
        share = shares.get(exchange)
        if share is None:
            share = shares[exchange] = _Share(lanes)
        share.users += 1
        self._shares = shares
        self._exchange = exchange
        self._share = share

    async def __aenter__(self) -> None:
        try:
            await self._share.lanes.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *_: object) -> None:
        self._share.lanes.release()
        self._leave()

    def _leave(self) -> None:
        self._share.users -= 1
        if self._share.users == 0:
            del self._shares[self._exchange]


class Publisher:
    """A bounded pool of confirm-mode channels. Made and used on one event loop."""

    def __init__(self, lanes: int = LANES) -> None:
        lanes = max(1, lanes)
        self._idle: List[Tuple[AbstractConnection, aiormq.abc.AbstractChannel]] = []
        self._lanes = asyncio.Semaphore(lanes)
        self._exchange_lanes = max(1, lanes // 4)
        self._shares: Dict[str, _Share] = {}

    async def publish(
        self,
        connection: AbstractConnection,
        server_id: str,
        exchange: str,
        body: bytes,
        properties: aiormq.spec.Basic.Properties,
        deadline: Optional[float] = None,
    ) -> None:
        """Publishes ``body`` with ``properties`` to ``exchange`` with
        routing key ``""`` and ``mandatory`` set, and waits for the broker's
        confirm. With a ``deadline`` (the event loop's time), the request's
        ``expiration`` is the time left when it is sent, after any wait for
        a lane here, so the broker drops a request nobody took before its
        caller gave up.

        Lanes are aiormq's channels, opened on the connection under
        aio-pika's, and the request goes straight to them: building an
        aio-pika ``Message`` first would add nothing here but CPU time
        (about a tenth of the client's per call, with the consumer's
        ``IncomingMessage``). An aio-pika channel would also leave a
        callback on the connection for good each time the broker closes
        it (a request to a server id nobody serves): about 2 KB a call.

        :raises NoSuchServer: the exchange does not exist, or no queue is
            bound to it.
        :raises AccessRefused: the user may not publish to the exchange.
        :raises Rejected: the broker refused the request (negative confirm).
        :raises TooLarge: the broker refused the request for its size.
        :raises NotSent: ``connection`` was lost before the request was
            written to it (while the request waited for a lane, or opened
            one).
        :raises ConnectionError: the connection failed.
        """
        # The exchange's share first: calls to a server that holds its
        # share wait without holding a lane others could use.
        async with _ExchangeLane(self._shares, exchange, self._exchange_lanes), self._lanes:
            channel = self._take(connection)
            try:
                if channel is None:
                    channel = await _open_lane(connection, server_id)
                if not opened(connection):
                    # Lost while this waited for a lane or opened one (or
                    # before the link was told): nothing is written yet.
                    raise _not_sent(server_id)
                if deadline is not None:
                    properties.expiration = str(
                        expiration_ms(deadline - asyncio.get_running_loop().time())
                    )
                await channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key="",
                    properties=properties,
                    mandatory=True,
                )
            except NotSent:
                raise  # an OSError too, not to be taken for one of aiormq's
            except aiormq.exceptions.PublishError:
                # Returned: the exchange exists but no queue is bound to it.
                self._give_back(connection, channel)
                raise errors.NoSuchServer(server_id) from None
            except aiormq.exceptions.DeliveryError:
                self._give_back(connection, channel)
                raise errors.Rejected(
                    f"the broker refused the request to {server_id!r} (negative confirm)"
                ) from None
            except aiormq.exceptions.ChannelNotFoundEntity:
                # The broker closed this lane: the exchange does not exist.
                raise errors.NoSuchServer(server_id) from None
            except aiormq.exceptions.ChannelAccessRefused as e:
                raise errors.AccessRefused(
                    f"the broker refused a request to {exchange!r}: {errors.reply_text(e)}"
                ) from None
            except aiormq.exceptions.ChannelPreconditionFailed as e:
                # The broker closed this lane. For its size: 406
                # PRECONDITION_FAILED "message size N is larger than
                # configured max size M" (RabbitMQ 3.8 to 4.x).
                text = errors.reply_text(e)
                if "max size" in text:
                    raise errors.TooLarge(
                        f"the broker refused the request to {server_id!r}: {text}"
                    ) from None
                raise errors.ConnectionError(
                    f"the request to {server_id!r} could not be sent: {text}"
                ) from e
            except asyncio.CancelledError:
                # Timed out waiting for its confirm: the lane may still get
                # that confirm, so it is closed rather than reused.
                if channel is not None:
                    _close_later(channel)
                if not cancelled_by_caller():
                    # aiormq fails what waits on a connection it gave up
                    # (its heartbeat watchdog) with a CancelledError of
                    # its own: the connection is lost, nobody cancelled.
                    raise errors.ConnectionError(
                        f"the request to {server_id!r} could not be sent: {_LOST}"
                    ) from None
                raise
            except (aiormq.exceptions.AMQPError, OSError, RuntimeError) as e:
                raise errors.ConnectionError(
                    f"the request to {server_id!r} could not be sent: {errors.reply_text(e)}"
                ) from e
            except Exception as e:
                if not errors.ended_without_error(e):
                    raise
                raise errors.ConnectionError(
                    f"the request to {server_id!r} could not be sent: {_LOST}"
                ) from None
            self._give_back(connection, channel)

    def _take(self, connection: AbstractConnection) -> Optional[aiormq.abc.AbstractChannel]:
        """An idle lane of ``connection``; lanes of earlier connections, or
        closed ones, are dropped on the way."""
        while self._idle:
            owner, channel = self._idle.pop()
            if owner is connection and not channel.is_closed and not connection.is_closed:
                return channel
        return None

    def _give_back(
        self, connection: AbstractConnection, channel: Optional[aiormq.abc.AbstractChannel]
    ) -> None:
        if channel is not None and not channel.is_closed:
            self._idle.append((connection, channel))

    def clear(self) -> None:
        """Forgets every lane (their connection is gone or going)."""
        self._idle.clear()


#: The longest ``expiration`` RabbitMQ takes (ms): a request of a call with a
#: longer timeout waits at most that long in the queue.
MAX_EXPIRATION_MS = 2**32 - 1


def expiration_ms(left: float) -> int:
    """A request's ``expiration`` for a call with ``left`` seconds to go."""
    return min(max(1, math.ceil(left * 1000)), MAX_EXPIRATION_MS)


def cancelled_by_caller() -> bool:
    """Whether the current task is being cancelled (by its caller, or a
    call's deadline), rather than handed a ``CancelledError`` an AMQP
    library raised for reasons of its own. Python before 3.11 cannot
    tell: there, every one is taken as a cancellation."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return cancelling is None or cancelling() > 0


_LOST = "the connection was lost"


def _not_sent(server_id: str) -> NotSent:
    """Why the request to ``server_id`` was not sent: its connection was lost."""
    return NotSent(f"the request to {server_id!r} was not sent: {_LOST}")


async def _open_lane(connection: AbstractConnection, server_id: str) -> aiormq.abc.AbstractChannel:
    """A new confirm-mode lane on aiormq's connection under ``connection``.

    :raises NotSent: the connection is lost (or closed).
    """
    under = aiormq_connection(connection)
    if under is None:
        raise _not_sent(server_id)
    try:
        return await under.channel(publisher_confirms=True, on_return_raises=True)
    except (Exception, asyncio.CancelledError) as e:
        # aiormq fails what waits on a connection it gave up (its
        # heartbeat watchdog) with a CancelledError of its own.
        if opened(connection) or (isinstance(e, asyncio.CancelledError) and cancelled_by_caller()):
            raise
        raise _not_sent(server_id) from None


def _close_later(channel: aiormq.abc.AbstractChannel) -> None:
    async def close() -> None:
        try:
            await channel.close()
        except Exception:  # a lane that is already gone is fine
            pass

    asyncio.ensure_future(close())

