"""The proxy's broker connection and reply queue, kept up across broker restarts.

A :class:`Link` opens the connection, declares the proxy's reply exchange
``client_USER_ex_UUID`` (direct, auto-delete) and its queue
``client_USER_queue_UUID`` bound to it with ``""``, and consumes that
queue, handing each reply to ``on_reply``. The queue is durable and
classic, and the broker deletes it once nobody has used it for
:data:`REPLY_QUEUE_EXPIRES`: it outlives its connection, so that the
replies to calls waiting when a reply nobody can read ended it are not
lost with it (see :mod:`callme_client.drain`). Replies are
acknowledged, at most :data:`REPLY_PREFETCH` at a time on their way (as the
Rust proxy does), so whoever may publish to the queue cannot make the proxy
hold more than that many: the rest waits in the broker. When
the connection (or the reply channel, or the reply consumer, which the
broker cancels when the queue is deleted) is lost it calls ``on_lost`` (the
proxy fails the calls waiting for replies, or has the queue drained), then
reconnects with backoff and declares a reply exchange and queue under new
names (see ``Link._name``), deleting the old queue unless it is drained;
calls made meanwhile wait for :meth:`Link.connection`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, Awaitable, Callable, Optional, Set, TypeVar

import aio_pika
import aiormq.abc
import aiormq.exceptions
import pamqp.commands
import pamqp.exceptions
from aio_pika.abc import AbstractChannel, AbstractConnection

from . import errors
from .options import ConnectOptions
from .protocol import MAX_NAME_BYTES, client_exchange, client_queue

__all__ = ["Link", "CONNECT_TIMEOUT", "REPLY_QUEUE_EXPIRES", "open_connection", "delete_queue", "seen"]

log = logging.getLogger("callme.proxy")

T = TypeVar("T")

#: A broker that does not answer a connection attempt within this time is
#: reported as down rather than left hanging (the Rust proxy's value),
#: unless the URL's ``connection_timeout`` (milliseconds) says otherwise.
CONNECT_TIMEOUT = 15.0

#: Seconds a reply queue nobody consumes, gets from or declares is kept
#: before the broker deletes it (``x-expires``; the Rust proxy's value).
REPLY_QUEUE_EXPIRES = 30.0

#: How long deleting a reply queue may hold up what waits for it (the
#: proxy's close): it is best effort, as the broker deletes it anyway.
DELETE_WITHIN = 1.0

#: Replies the broker sends before any is acknowledged: with the broker's
#: message size limit, what a flood of replies can make a proxy hold.
REPLY_PREFETCH = 64

#: Replies acknowledged together, and how long replies taken wait for more
#: before they are acknowledged anyway.
_ACK_EVERY = 16
_ACK_IDLE = 0.05

#: How often the link looks whether the broker still has its reply
#: consumer, where the AMQP library does not say when it cancels it.
_CONSUMER_CHECK = 1.0

#: Reconnection backoff: the first retry comes soon (a restart takes a few
#: seconds), later ones at most this far apart.
_BACKOFF_FIRST = 0.1
_BACKOFF_MAX = 3.0


class Link:
    """One proxy's connection and reply queue. Made and used on one event loop."""

    def __init__(
        self,
        options: ConnectOptions,
        on_reply: Callable[[str, bytes], None],
        on_lost: Callable[[str, bool], bool],
    ) -> None:
        self.options = options
        # The reply exchange and queue: named anew for each connection
        # (see `_name`), once the last names served one.
        self.exchange = ""
        self.queue = ""
        self._served = False
        self._on_reply = on_reply
        self._on_lost = on_lost
        self._connection: Optional[AbstractConnection] = None
        self._ready = asyncio.Event()
        self._task: Optional["asyncio.Task[None]"] = None
        self._closing = False
        # The last reply taken and not yet acknowledged (its channel and
        # tag), how many are, and the timer that acknowledges them.
        self._unacked: "Optional[tuple[Any, int]]" = None
        self._taken = 0
        self._ack_timer: Optional[asyncio.TimerHandle] = None
        # The reply consumer: its channel (aiormq's) and tag.
        self._consumer: "tuple[Any, str]" = (None, "")
        # While the broker refuses the reply queue on reconnecting (a
        # permission taken away), why: calls fail with it at once.
        self._refused: Optional[errors.AccessRefused] = None
        # Old reply queues being deleted in the background.
        self._chores: "Set[asyncio.Task[None]]" = set()

    async def start(self) -> None:
        """Connects for the first time; later losses are repaired in the
        background.

        :raises AccessRefused: the broker refused the login or a declare.
        :raises ConnectionError: the broker could not be reached.
        """
        connection, channel = await self._open()
        self._task = asyncio.ensure_future(self._keep(connection, channel))

    async def connection(self) -> AbstractConnection:
        """The connection the reply queue is consumed on, waiting for one
        while the link is being re-established.

        :raises ConnectionError: the link is closed.
        """
        while True:
            if self._closing:
                raise errors.ConnectionError("the proxy is closed")
            connection = self._connection
            if connection is not None and opened(connection):
                return connection
            if self._refused is not None:
                raise errors.AccessRefused(
                    f"the proxy cannot declare its reply queue again: {self._refused}"
                )
            self._ready.clear()
            await self._ready.wait()

    @property
    def connected(self) -> bool:
        """Whether the reply queue is being consumed now."""
        return self._connection is not None and opened(self._connection)

    async def close(self) -> None:
        """Deletes the reply queue (its exchange goes with it), waiting at
        most :data:`DELETE_WITHIN`, and closes the connection for good."""
        self._closing = True
        self._ready.set()
        if self._ack_timer is not None:
            # The replies go with the connection: nothing to acknowledge.
            self._ack_timer.cancel()
            self._ack_timer = None
        connection, self._connection = self._connection, None
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        for chore in self._chores:
            chore.cancel()
        if connection is not None and not connection.is_closed:
            try:
                # Its consumer first: the broker cancels a consumer whose
                # queue is deleted, and aiormq warns of it.
                underlay, tag = self._consumer
                if underlay is not None and not underlay.is_closed:
                    loop = asyncio.get_running_loop()
                    await _by(loop.time() + DELETE_WITHIN, underlay.basic_cancel(tag))
            except Exception:  # best effort: the delete goes on
                pass
            try:
                # Else the broker deletes it once unused for REPLY_QUEUE_EXPIRES.
                await delete_queue(connection, self.queue)
            finally:
                await _close_quietly(connection)

    def _name(self) -> None:
        """New names for the reply exchange and queue.

        Any server the proxy calls learns them, and anyone who may write to
        them can end the connection with one message its AMQP library
        cannot read (a correlation id that is not UTF-8, say): the library
        gives the connection up, failing every call in flight. Named anew
        for each connection, they are not there to be written to again the
        moment it is back: a server has to be called again to learn them.
        """
        uid = str(uuid.uuid4())
        self.exchange = client_exchange(self.options.user, uid)
        self.queue = client_queue(self.options.user, uid)

    async def _open(self) -> "tuple[AbstractConnection, AbstractChannel]":
        options = self.options
        # A declare that failed part-way (the exchange made, its queue
        # refused) is tried again under the same names, leaving no
        # exchange behind that nothing would ever bind and delete.
        if self._served or not self.exchange:
            self._name()
            self._served = False
        limit = options.handshake_timeout(CONNECT_TIMEOUT)
        # One limit for the whole of it, the reply queue's set-up too: a
        # broker that takes the handshake and then stalls (a node cut off
        # from its cluster's majority, which cannot declare) must not
        # keep the proxy waiting for ever.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        connection = await open_connection(options, limit)

        async def set_up() -> Any:
            channel = await connection.channel(publisher_confirms=False)
            # Declared and consumed on aiormq's channel under aio-pika's,
            # by frames that take any name (see `_ExchangeDeclare`); a
            # reply needs its correlation id and body only, not an
            # IncomingMessage.
            underlay = await channel.get_underlay_channel()
            await underlay.rpc(_ExchangeDeclare(
                exchange=self.exchange, exchange_type="direct", durable=False, auto_delete=True
            ))
            # Durable, so that RabbitMQ 4.x takes a queue that is not
            # exclusive (its "Deprecated Features" guide:
            # transient_nonexcl_queues); classic whatever the vhost's
            # default queue type (3.13 and 4.x), since a quorum queue per
            # proxy would cost a Raft group and a stream takes no expiry.
            await underlay.rpc(_QueueDeclare(
                queue=self.queue,
                durable=True,
                arguments={
                    "x-queue-type": "classic",
                    "x-expires": int(REPLY_QUEUE_EXPIRES * 1000),
                },
            ))
            await underlay.rpc(_QueueBind(queue=self.queue, exchange=self.exchange, routing_key=""))
            await underlay.basic_qos(prefetch_count=REPLY_PREFETCH)
            # Exclusively: the queue is not exclusive to the connection,
            # and nobody else is to take its replies. By the empty name:
            # the queue last declared on the channel, this one.
            consume = await underlay.basic_consume(
                LAST_DECLARED, self._deliver, no_ack=False, exclusive=True
            )
            self._consumer = (underlay, consume.consumer_tag)
            return channel

        try:
            channel = await _by(deadline, set_up())
        except BaseException as e:
            await _close_quietly(connection)
            if isinstance(e, asyncio.TimeoutError):
                raise errors.ConnectionError(
                    f"the broker at {options.redacted} did not set up the reply queue "
                    f"within {limit:g} s of connecting"
                ) from None
            if isinstance(e, aiormq.exceptions.ChannelAccessRefused):
                raise _ReplyQueueRefused(
                    f"the broker refused the reply queue {self.queue!r}: {errors.reply_text(e)}"
                ) from None
            if isinstance(e, (aiormq.exceptions.AMQPError, OSError, RuntimeError)) or (
                errors.ended_without_error(e)
            ):
                raise errors.ConnectionError(
                    f"cannot declare the reply queue {self.queue!r}: {errors.reply_text(e)}"
                ) from None
            raise
        self._served = True
        log.debug(
            "proxy ready: broker %s, reply exchange %s", options.redacted, self.exchange
        )
        return connection, channel

    async def _keep(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing:
            lost: "asyncio.Future[None]" = loop.create_future()
            # What the connection and the channel were closed with.
            reasons: "list[Any]" = []

            def on_close(*args: Any) -> None:
                reasons.extend(args[1:])
                if not lost.done():
                    lost.set_result(None)

            connection.close_callbacks.add(on_close)
            channel.close_callbacks.add(on_close)
            # The broker cancels the reply consumer when the queue is
            # deleted (an operator, a clean-up script), and keeps the
            # channel open: without the queue no reply can come, so that is
            # a loss too. aiormq 7 says so at once; aiormq 6 only forgets
            # the consumer, which is looked for every second.
            underlay, tag = self._consumer

            def on_cancel(frame: Any) -> None:
                if getattr(frame, "consumer_tag", None) == tag:
                    on_close()

            cancel_callbacks = getattr(underlay, "on_consumer_cancel_callbacks", None)
            if cancel_callbacks is not None:
                cancel_callbacks.add(on_cancel)
            self._connection = connection
            self._ready.set()
            if connection.is_closed or channel.is_closed:
                on_close()
            check: Optional[asyncio.TimerHandle] = None

            def look() -> None:
                nonlocal check
                if tag not in underlay.consumers:
                    on_close()
                elif not lost.done():
                    check = loop.call_later(_CONSUMER_CHECK, look)

            look()
            await lost
            if check is not None:
                check.cancel()
            self._connection = None
            self._ready.clear()
            if self._closing:
                return
            if tag not in underlay.consumers and not channel.is_closed:
                log.warning(
                    "the broker cancelled the reply consumer (was the queue %s deleted?); "
                    "connecting again", self.queue
                )
            else:
                log.warning(
                    "lost the connection to the broker at %s; reconnecting", self.options.redacted
                )
            unreadable = any(is_unreadable(reason) for reason in reasons)
            old = self.queue
            drained = self._on_lost(old, unreadable)
            await _close_quietly(connection)
            connection, channel = await self._reopen()
            log.warning("reconnected to the broker at %s", self.options.redacted)
            if not drained and old != self.queue:
                # Its replies are for calls that failed with the loss.
                chore = asyncio.ensure_future(delete_queue(connection, old))
                self._chores.add(chore)
                chore.add_done_callback(self._chores.discard)

    async def _reopen(self) -> "tuple[AbstractConnection, AbstractChannel]":
        delay = _BACKOFF_FIRST
        attempts = 0
        while True:
            await asyncio.sleep(delay)
            attempts += 1
            # Each attempt is a task of its own, so that a CancelledError
            # it ends with is aiormq's (giving up the connection it was
            # opening), never this task's: before Python 3.11 the two look
            # the same, and taking aiormq's for a close would end the link.
            attempt = asyncio.ensure_future(self._open())
            try:
                await asyncio.wait({attempt})
            except asyncio.CancelledError:
                # The proxy is closing: the attempt goes too.
                attempt.cancel()
                await asyncio.wait({attempt})
                if not attempt.cancelled() and attempt.exception() is None:
                    await _close_quietly(attempt.result()[0])
                raise
            try:
                opened = attempt.result()
                self._refused = None
                return opened
            except _ReplyQueueRefused as e:
                # Calls waiting for the link, and made while this lasts,
                # fail with it rather than wait out their timeouts (as the
                # Rust proxy's do; a refused login is waited out, as there).
                self._refused = e
                self._ready.set()
                level = logging.WARNING if attempts % 10 == 1 else logging.DEBUG
                log.log(level, "reconnecting (attempt %d) refused: %s", attempts, e)
            except BaseException as e:
                # A CancelledError aiormq raised for itself, an error no
                # one foresaw, or a KeyboardInterrupt or SystemExit meant
                # for the thread running the loop (asyncio raises it there
                # too): an attempt that failed. The link must never stop
                # trying while the proxy is open. A refusal of before no
                # longer stands: calls wait for the connection.
                self._refused = None
                # Every 10th failure is logged at warning level, so an
                # outage says it goes on without flooding the log.
                level = logging.WARNING if attempts % 10 == 1 else logging.DEBUG
                log.log(level, "reconnecting (attempt %d) failed: %s", attempts, str(e) or type(e).__name__)
            delay = min(delay * 2, _BACKOFF_MAX)

    async def _deliver(self, message: aiormq.abc.DeliveredMessage) -> None:
        correlation_id = message.header.properties.correlation_id
        if correlation_id is None:
            log.debug("dropped a reply without correlation id")
        else:
            self._on_reply(correlation_id, message.body)
        tag = message.delivery_tag
        if tag is None:
            return
        unacked = self._unacked
        if unacked is None or unacked[0] is not message.channel or unacked[1] < tag:
            # The highest tag taken: `multiple` settles it and all before.
            self._unacked = (message.channel, tag)
        self._taken += 1
        if self._taken >= _ACK_EVERY:
            self._ack()
        elif self._ack_timer is None:
            self._ack_timer = asyncio.get_running_loop().call_later(_ACK_IDLE, self._ack)

    def _ack(self) -> None:
        """Acknowledges every reply taken so far (``multiple``)."""
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        unacked, self._unacked, self._taken = self._unacked, None, 0
        if unacked is None:
            return
        channel, tag = unacked
        if channel.is_closed:
            return  # its replies went with it
        ack = asyncio.ensure_future(channel.basic_ack(tag, multiple=True, wait=False))
        ack.add_done_callback(_ack_done)


async def open_connection(
    options: ConnectOptions, limit: float, purpose: Optional[str] = None
) -> AbstractConnection:
    """A connection to the broker of ``options``, named ``purpose`` if
    given (see :meth:`ConnectOptions.connection_url`), made within
    ``limit`` seconds.

    :raises AccessRefused: the broker refused the login.
    :raises ConnectionError: the broker could not be reached.
    """
    try:
        # Read again at each connect (a certificate renewed in place);
        # one gone or broken since is this connect's failure.
        ssl_context = options.ssl_context()
    except ValueError as e:
        raise errors.ConnectionError(str(e)) from None
    try:
        connection = await aio_pika.connect(
            options.connection_url(purpose),
            ssl_context=ssl_context,
            timeout=limit,
        )
    except (aiormq.exceptions.ProbableAuthenticationError,
            aiormq.exceptions.AuthenticationError,
            aiormq.exceptions.ConnectionNotAllowed) as e:
        raise errors.AccessRefused(
            f"the broker at {options.redacted} refused the login: {errors.reply_text(e)}"
        ) from None
    except asyncio.TimeoutError:
        raise errors.ConnectionError(
            f"the broker at {options.redacted} did not answer within {limit:g} s"
        ) from None
    except (aiormq.exceptions.AMQPError, pamqp.exceptions.PAMQPException, OSError) as e:
        # pamqp's own errors too: aiormq 6 raises one when the broker
        # closes the connection during its handshake (a connection
        # limit reached).
        raise errors.ConnectionError(
            f"cannot connect to the broker at {options.redacted}: {errors.reply_text(e)}"
        ) from None
    _never_drop_frames(connection)
    return connection


async def delete_queue(connection: AbstractConnection, queue: str) -> None:
    """Deletes the reply queue ``queue`` (its auto-delete exchange goes
    with its binding) on a channel of ``connection`` of its own, giving up
    after :data:`DELETE_WITHIN`: best effort, as the broker deletes it
    anyway once unused for :data:`REPLY_QUEUE_EXPIRES`."""

    async def delete() -> None:
        channel = await connection.channel(publisher_confirms=False)
        underlay = await channel.get_underlay_channel()
        await underlay.rpc(_QueueDelete(queue=queue))
        await channel.close()

    try:
        await _by(asyncio.get_running_loop().time() + DELETE_WITHIN, delete())
    except Exception as e:  # best effort, whatever the library raises
        log.debug("reply queue %s not deleted (the broker will): %s", queue, str(e) or type(e).__name__)


def is_unreadable(reason: Any) -> bool:
    """Whether ``reason``, what a connection was closed with, is a frame
    the AMQP library could not read: a short string that is not UTF-8,
    say, which the broker passes on as it got it.

    aiormq 7 closes with ``InvalidFrameError`` (caused by pamqp's
    ``UnmarshalingException``), aiormq 6 with pamqp 3's bare
    ``UnicodeDecodeError``. Headers nested deeper than pamqp's decoder,
    which recurses, can go (a few kilobytes of tables in tables, which
    RabbitMQ passes on) end the reader with a ``RecursionError``.
    """
    seen = 0
    while isinstance(reason, BaseException) and seen < 8:
        if isinstance(reason, (aiormq.exceptions.InvalidFrameError,
                               pamqp.exceptions.UnmarshalingException,
                               UnicodeDecodeError, RecursionError)):
            return True
        reason = reason.__cause__ or reason.__context__
        seen += 1
    return False


#: The queue name AMQP 0-9-1 takes for the queue last declared on the
#: channel (in ``basic.consume``, ``basic.get``, ``queue.bind``...), which
#: RabbitMQ follows.
LAST_DECLARED = ""


def _check_name(*names: str) -> None:
    """Raises ``ValueError`` for a name AMQP cannot carry (a short string:
    at most :data:`MAX_NAME_BYTES` of UTF-8)."""
    for name in names:
        size = len(name.encode())
        if size > MAX_NAME_BYTES:
            raise ValueError(f"an AMQP name is at most {MAX_NAME_BYTES} bytes, not {size}")


# The frames that name the reply exchange and queue, which carry the broker
# user's name as it is (``client_USER_ex_UUID``, as the Rust proxy's):
# pamqp's own, but for the check of their names. pamqp (3.3 and 4.x)
# checks a frame in ``validate``, called when it is made and when it is
# written, and takes for names only ASCII letters, digits and
# ``-_.:@#,/`` (4.x also ``+``) and space, and at most 127 characters for
# an exchange's: ``ValueError('Invalid value for exchange')`` for users
# that RabbitMQ takes, such as a certificate's distinguished name
# (``CN=client,O=acme``) or ``josé``. AMQP takes any UTF-8 of up to 255
# bytes, and so do these; aiormq's ``Channel.rpc`` sends them as it sends
# pamqp's. The queue is consumed and read (``basic.consume``,
# ``basic.get``, whose frames aiormq makes itself) by :data:`LAST_DECLARED`.


class _ExchangeDeclare(pamqp.commands.Exchange.Declare):
    def validate(self) -> None:
        _check_name(self.exchange)


class _QueueDeclare(pamqp.commands.Queue.Declare):
    def validate(self) -> None:
        _check_name(self.queue)


class _QueueBind(pamqp.commands.Queue.Bind):
    def validate(self) -> None:
        _check_name(self.queue, self.exchange)


class _QueueDelete(pamqp.commands.Queue.Delete):
    def validate(self) -> None:
        _check_name(self.queue)


class _ReplyQueueRefused(errors.AccessRefused):
    """The broker refused the proxy's reply exchange or queue."""


def seen(future: "asyncio.Future[Any]") -> None:
    """Takes ``future``'s error as seen, for a future nobody may await:
    asyncio reports an error never looked at."""
    if not future.cancelled():
        future.exception()


def _ack_done(ack: "asyncio.Future[None]") -> None:
    if not ack.cancelled() and ack.exception() is not None:
        log.debug("replies not acknowledged: %s", ack.exception())


def aiormq_connection(connection: AbstractConnection) -> Optional[aiormq.abc.AbstractConnection]:
    """aiormq's connection under aio-pika's ``connection``; None once
    aio-pika has let it go (closed)."""
    transport = getattr(connection, "transport", None)
    if transport is None:
        return None
    under: Optional[aiormq.abc.AbstractConnection] = getattr(transport, "connection", None)
    return under


def opened(connection: AbstractConnection) -> bool:
    """Whether ``connection`` may carry a request: open, and its AMQP
    connection's reader and writer still running. aiormq takes some twenty
    passes of the event loop from reading the end of the socket to closing
    aio-pika's connection (and telling the link); a request sent in
    between would fail with it."""
    if connection.is_closed:
        return False
    under = aiormq_connection(connection)
    return under is not None and bool(under.is_opened)


async def _close_quietly(connection: AbstractConnection) -> None:
    try:
        await connection.close()
    except Exception:  # a connection the broker closed may fail to close again
        pass


def _never_drop_frames(connection: AbstractConnection) -> None:
    """Makes the write queue of ``connection``'s aiormq connection unbounded.

    aiormq (6.8 and 7.2) answers the broker's ``Channel.Close`` by putting
    a ``CloseOk`` on that queue with ``put_nowait``, and drops it when the
    queue is full (10 frames, under load). The broker then still holds the
    channel, and the next channel aiormq opens with its number makes the
    broker close the whole connection ("second 'channel.open' seen"): a
    call to a missing server would fail every call in flight. Requests
    here are bounded by the publisher's lanes, so the queue stays small.
    """
    queue = getattr(aiormq_connection(connection), "write_queue", None)
    if isinstance(queue, asyncio.Queue):
        setattr(queue, "_maxsize", 0)
    else:
        log.warning("cannot reach aiormq's write queue: a busy proxy may lose its connection "
                    "when a call finds no server")


async def _by(deadline: float, work: "Awaitable[T]") -> T:
    """Awaits ``work`` until ``deadline`` (the loop's time), then raises
    ``asyncio.TimeoutError``. In this task, unlike ``asyncio.wait_for``
    before Python 3.12, which runs it in a task of its own: a
    KeyboardInterrupt raised there reached the thread running the loop
    twice, once from that task and once from this one awaiting it."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    expired = False

    def expire() -> None:
        nonlocal expired
        expired = True
        task.cancel()

    timer = loop.call_at(deadline, expire)
    try:
        done = await work
    except asyncio.CancelledError:
        if not expired:
            raise
        # Python 3.11 and later count cancellations: this one is taken
        # back, and a cancel from elsewhere meanwhile still stands.
        uncancel = getattr(task, "uncancel", None)
        if uncancel is not None and uncancel() > 0:
            raise
        raise asyncio.TimeoutError() from None
    finally:
        timer.cancel()
    if expired:
        # Expired as `work` ended, which swallowed the cancel.
        uncancel = getattr(task, "uncancel", None)
        if uncancel is not None:
            uncancel()
    return done
