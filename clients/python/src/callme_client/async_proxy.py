"""The asyncio proxy: calls functions of callme servers by id, over one connection.

An :class:`AsyncProxy` connects when first used (or on ``await
proxy.connect()`` / ``async with``), publishes each request to
``server_ID_ex`` with publisher confirms and ``mandatory`` set, and matches
replies to calls by correlation id, so any number of calls can be in flight
at once on its one connection. A request nobody can route fails at once with
:class:`NoSuchServer`; a reply that comes after its call timed out is
dropped. When the connection is lost, calls waiting for replies fail with
:class:`ConnectionError`, unless a reply it could not read ended it (see
:mod:`callme_client.drain`); the proxy reconnects by itself, and calls made
meanwhile wait for it within their timeouts.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import math
import secrets
import time
import uuid
from functools import partial
from typing import Any, Awaitable, Callable, Dict, Mapping, Optional, Sequence, Set

import aiormq

from . import errors
from .drain import MAX_DRAINS, drain
from .link import Link, seen
from .options import ConnectOptions
from .protocol import (
    CONTENT_TYPE,
    DEFAULT_MAX_REPLY_BYTES,
    DEFAULT_MAX_REQUEST_BYTES,
    DESCRIBE,
    REPLY_QUEUE,
    check_reply_user,
    decode_response,
    encode_request,
    readable_in_error,
    server_exchange,
    valid_server_id,
)
from .pending import LOST, Pending
from .publisher import MAX_EXPIRATION_MS, NotSent, Publisher

__all__ = ["AsyncProxy", "AsyncServerProxy", "DEFAULT_TIMEOUT"]

log = logging.getLogger("callme.proxy")

#: The seed's default: a call waits this long (seconds) for its reply.
DEFAULT_TIMEOUT = 60.0


class AsyncProxy:
    """A client of callme servers for asyncio code.

    ``amqp_url`` is an ``amqp://`` or ``amqps://`` URI (default:
    ``CALLME_AMQP_URL``); the seed's ``amqp_host``, ``amqp_user``,
    ``amqp_password``, ``amqp_vhost``, ``amqp_port`` and ``ssl`` arguments
    work too. ``ca_file`` verifies the broker with that CA; ``cert_file``
    and ``key_file`` log in with a client certificate (EXTERNAL).
    ``timeout`` (seconds) is the default for every call
    (:data:`DEFAULT_TIMEOUT`, 60 s, when it is ``None``, as for
    :meth:`use_server` and :meth:`call`);
    ``connection_name`` is shown by the broker's management tools.
    ``max_reply_bytes`` is the largest reply taken (16 MiB by default),
    with at most one JSON object per 32 bytes of it: a larger reply fails
    its call with :class:`Internal`, unread, so no server can make the
    caller parse a broker-sized reply into gigabytes.
    ``max_request_bytes`` is the largest request sent (16 MiB by default):
    a larger one raises :class:`TooLarge` before anything is sent.

    A proxy belongs to the event loop it first connects on; any number of
    tasks of that loop share it. Used from another loop, it raises
    :class:`RuntimeError`.
    """

    def __init__(
        self,
        amqp_url: Optional[str] = None,
        timeout: Optional[float] = DEFAULT_TIMEOUT,
        *,
        amqp_host: Optional[str] = None,
        amqp_user: Optional[str] = None,
        amqp_password: Optional[str] = None,
        amqp_vhost: Optional[str] = None,
        amqp_port: Optional[int] = None,
        ssl: bool = False,
        ca_file: Optional[str] = None,
        cert_file: Optional[str] = None,
        key_file: Optional[str] = None,
        connection_name: Optional[str] = None,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        self._options = ConnectOptions.build(
            amqp_url,
            amqp_host=amqp_host,
            amqp_user=amqp_user,
            amqp_password=amqp_password,
            amqp_vhost=amqp_vhost,
            amqp_port=amqp_port,
            ssl=ssl,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            connection_name=connection_name,
        )
        # Its reply names carry the user's name: refused now if they
        # cannot be AMQP names.
        check_reply_user(self._options.user)
        self._timeout = DEFAULT_TIMEOUT if timeout is None else _positive(timeout)
        self._max_reply_bytes = _byte_limit("max_reply_bytes", max_reply_bytes)
        self._max_request_bytes = _byte_limit("max_request_bytes", max_request_bytes)
        # What the broker names beside an exchange in its errors: read
        # from the URL once, not at every call.
        self._echo = (self._options.vhost, self._options.login)
        self._link: Optional[Link] = None
        self._publisher: Optional[Publisher] = None
        self._starting: Optional["asyncio.Future[None]"] = None
        self._pending = Pending()
        # Reply queues left by connections an unreadable reply ended,
        # being read for the calls waiting on them.
        self._drains: "Set[asyncio.Task[None]]" = set()
        self._closed = False
        # The event loop it first connected on, which its connection's
        # tasks run on.
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    def _check_loop(self) -> None:
        """Raises if this runs on another event loop than the proxy's.

        Its connection lives on the loop it first connected on: from
        another (a second ``asyncio.run``, a test framework's loop per
        test), calls would wait out their timeout for a connection whose
        loop no longer runs, or write to it from the wrong loop.
        """
        if self._loop is not None and self._loop is not asyncio.get_running_loop():
            raise RuntimeError(
                "this AsyncProxy belongs to the event loop it first connected on, "
                "and this is another one: make one AsyncProxy per event loop"
            )

    @property
    def timeout(self) -> float:
        """The timeout (seconds) of calls that do not set one."""
        return self._timeout

    @property
    def max_reply_bytes(self) -> int:
        """The largest reply (in bytes) this proxy takes."""
        return self._max_reply_bytes

    @property
    def max_request_bytes(self) -> int:
        """The largest request (in bytes) this proxy sends."""
        return self._max_request_bytes

    @property
    def reply_exchange(self) -> Optional[str]:
        """The exchange this proxy receives replies on, once connected."""
        return self._link.exchange if self._link is not None else None

    @property
    def broker(self) -> str:
        """The broker's URL, without its password."""
        return self._options.redacted

    def use_server(self, server_id: str, timeout: Optional[float] = None) -> "AsyncServerProxy":
        """A handle on the server ``server_id``: ``await
        proxy.use_server("calc").add(1, 2)``. ``timeout`` overrides the
        proxy's default for calls made through it."""
        return AsyncServerProxy(self, server_id, self._timeout if timeout is None else timeout)

    async def connect(self) -> None:
        """Connects now rather than at the first call.

        :raises AccessRefused: the broker refused the login.
        :raises ConnectionError: the broker could not be reached.
        """
        if self._closed:
            raise errors.ConnectionError("the proxy is closed")
        self._check_loop()
        if self._link is not None:
            return
        if self._starting is None or self._starting.done():
            # None yet, or one that failed after every caller waiting for
            # it had given up: its error is stale, so this tries again.
            self._starting = asyncio.ensure_future(self._start())
            # Its error taken as seen: when every caller gave up on it,
            # nobody else looks.
            self._starting.add_done_callback(seen)
        starting = self._starting
        try:
            await asyncio.shield(starting)
        except BaseException:
            if starting.done() and self._starting is starting:
                # The next call tries again, whatever this attempt ended
                # with (a caller cancelled while it waits leaves it going).
                self._starting = None
            if starting.done() and starting.cancelled():
                # Nobody cancels the attempt but aiormq, giving up the
                # connection it was opening: a failed attempt.
                raise errors.ConnectionError(
                    f"cannot connect to the broker at {self._options.redacted}: "
                    "the connection was given up while it opened"
                ) from None
            raise

    async def _start(self) -> None:
        link = Link(self._options, self._on_reply, self._on_lost)
        await link.start()
        if self._closed:
            await link.close()
            raise errors.ConnectionError("the proxy was closed while it connected")
        self._publisher = Publisher()
        self._link = link
        # Bound to this loop once connected: a first connect that failed
        # leaves the proxy free for another loop (a program trying again
        # under a new asyncio.run).
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        """Closes the connection; calls still waiting fail with
        :class:`ConnectionError`."""
        self._closed = True
        link, self._link = self._link, None
        # At once: a reply coming while the queue is deleted is not waited for.
        self._pending.fail("the proxy was closed before the reply came")
        try:
            if link is not None:
                await link.close()
        finally:
            # Nobody waits for their queues now: each deletes its own, if
            # it can soon; else the broker does, once they expire.
            if self._drains:
                _, late = await asyncio.wait(set(self._drains), timeout=_DRAINS_END_WITHIN)
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.wait(late)

    async def __aenter__(self) -> "AsyncProxy":
        await self.connect()
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.close()

    async def call(
        self,
        server_id: str,
        func: str,
        args: Sequence[Any] = (),
        kwargs: Optional[Mapping[str, Any]] = None,
        *,
        timeout: Optional[float] = None,
    ) -> Any:
        """Calls ``func`` of ``server_id`` and returns its result.

        :raises Timeout: no reply within ``timeout`` seconds (default: the
            proxy's); a :class:`RemoteTimeout` when the server stopped the
            call for its own limits.
        :raises NoSuchServer: nothing serves ``server_id``.
        :raises RemoteError: the server's error, as the subclass of its type.
        :raises AccessRefused: the user may not call this server.
        :raises ConnectionError: no connection to the broker, or it was
            lost before the reply came.
        :raises TypeError, ValueError: an argument is not JSON-serialisable;
            ValueError also for a server id over 117 characters (pamqp
            writes exchange names of at most 127), or too long to be named
            in the broker's errors readably with a vhost or user name that
            is not ASCII (see :func:`protocol.readable_in_error`).
        """
        timeout = self._timeout if timeout is None else _positive(timeout)
        self._check_loop()
        body = encode_request(func, args, kwargs)
        if not valid_server_id(server_id):
            raise errors.NoSuchServer(server_id)
        exchange = server_exchange(server_id)
        if len(exchange) > MAX_EXCHANGE_NAME:
            raise ValueError(
                f"server id {server_id!r} is {len(server_id)} characters: the AMQP library "
                f"(pamqp) takes exchange names of at most {MAX_EXCHANGE_NAME}, so this client "
                f"calls ids of at most {MAX_EXCHANGE_NAME - len(server_exchange(''))}"
            )
        if not readable_in_error(exchange, *self._echo):
            raise ValueError(
                f"server id {server_id!r} is too long to call as this proxy's user on its vhost: "
                "with a vhost or user name that is not ASCII, an error of the broker about it "
                "could be cut in the middle of a character, which would end the connection"
            )
        if len(body) > self._max_request_bytes:
            # Its frames would hold up every other call on the connection
            # while they are written, for the broker (or the server, 4 MiB
            # by default) to refuse it after.
            raise errors.TooLarge(
                f"the request to {server_id!r} is {len(body)} bytes, over the proxy's "
                f"max_request_bytes of {self._max_request_bytes}; nothing was sent"
            )
        stage = ["connecting"]
        # The call runs in the caller's task, under a timer that cancels it
        # at the deadline (asyncio.wait_for would make a task per call).
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("AsyncProxy.call must be awaited in a task")
        expired: "list[bool]" = []
        # Cancellations asked of the task before this call (in a clean-up
        # after one, say): not this call's business.
        cancelled_before = _cancellations(task)

        def expire() -> None:
            expired.append(True)
            task.cancel()

        loop = asyncio.get_running_loop()
        deadline = loop.call_later(timeout, expire)
        try:
            return await self._call(server_id, func, body, loop.time() + timeout, stage)
        except asyncio.CancelledError:
            if not expired or _cancellations(task) > cancelled_before + 1:
                raise  # cancelled by the caller
            if stage[0] == "connecting":
                raise errors.ConnectionError(
                    f"no connection to the broker at {self.broker} within the call's "
                    f"timeout of {timeout:g} s"
                ) from None
            raise errors.Timeout(
                f"no reply from {server_id!r} to {func}() within {timeout:g} s"
            ) from None
        finally:
            deadline.cancel()
            if expired:
                # The timer's cancellation is over (Python 3.11 and later
                # count them, for asyncio.timeout and task groups).
                uncancel = getattr(task, "uncancel", None)
                if uncancel is not None:
                    uncancel()

    async def _call(
        self, server_id: str, func: str, body: bytes, deadline: float, stage: "list[str]"
    ) -> Any:
        await self.connect()
        link, publisher = self._link, self._publisher
        if link is None or publisher is None:
            raise errors.ConnectionError("the proxy is closed")
        while True:
            stage[0] = "connecting"
            connection = await link.connection()
            stage[0] = "calling"
            correlation_id = str(uuid.uuid4())
            reply = self._pending.add(correlation_id, link.queue)
            try:
                properties = self._properties(correlation_id, link.exchange, link.queue)
                log.debug("call %s.%s correlation_id=%s", server_id, func, correlation_id)
                try:
                    await publisher.publish(
                        connection, server_id, server_exchange(server_id), body, properties,
                        deadline,
                    )
                except NotSent:
                    # The connection went as the request was about to be
                    # sent: it goes on the next one, within the timeout.
                    log.debug("call %s.%s correlation_id=%s waits for the next connection",
                              server_id, func, correlation_id)
                    continue
                response = await reply
                break
            finally:
                self._pending.remove(correlation_id)
        try:
            return decode_response(response, self._max_reply_bytes)
        except errors.RemoteError as e:
            log.debug("%s.%s failed remotely: %s", server_id, func, e.type)
            raise
        except ValueError as e:
            raise errors.RemoteError(
                "BadResponse", f"the reply of {server_id!r} is not a callme response: {e}"
            ) from None

    @staticmethod
    def _properties(correlation_id: str, exchange: str, queue: str) -> aiormq.spec.Basic.Properties:
        """A request's properties, its replies to go to ``exchange`` (and
        ``queue``, by the default exchange)."""
        sent_ms = time.time_ns() // 1_000_000
        return aiormq.spec.Basic.Properties(
            content_type=CONTENT_TYPE,
            correlation_id=correlation_id,
            reply_to=exchange,
            # Set by the publisher once it may send: the time the call
            # has left then.
            expiration=str(MAX_EXPIRATION_MS),
            delivery_mode=1,  # not persistent
            # When it was sent, for the host's queue-wait metric
            # (docs/protocol.md), and a W3C trace of its own: new, so not
            # sampled (flags 00), as the Rust proxy's new traces.
            timestamp=datetime.datetime.fromtimestamp(sent_ms // 1000, tz=datetime.timezone.utc),
            headers={
                "timestamp_in_ms": sent_ms,
                "traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00",
                REPLY_QUEUE: queue,
            },
        )

    def _reconnecting(self) -> bool:
        """Whether the proxy, connected before and not closed, waits for
        its connection to be made again."""
        link = self._link
        return link is not None and not self._closed and not link.connected

    def _on_reply(self, correlation_id: str, body: bytes) -> None:
        self._pending.reply(correlation_id, body)

    def _on_lost(self, queue: str, unreadable: bool) -> bool:
        """The connection whose reply queue was ``queue`` is lost, to a
        reply it could not read if ``unreadable``. Its calls waiting for
        replies fail, or, after an unreadable reply, wait on for the
        replies a drain takes from ``queue``; whether one does."""
        if self._publisher is not None:
            self._publisher.clear()
        calls = self._pending.waiting_on(queue)
        if unreadable and calls and len(self._drains) < MAX_DRAINS:
            task = asyncio.ensure_future(
                drain(self._options, queue, self._pending, calls)
            )
            self._drains.add(task)

            def done(task: "asyncio.Task[None]") -> None:
                self._drains.discard(task)
                if not task.cancelled() and task.exception() is not None:
                    log.error("reading the reply queue %s failed", queue, exc_info=task.exception())
                # However it ended (an error not foreseen, a cancel aiormq
                # raised for itself), no call of its waits out its timeout.
                self._pending.fail(LOST, queue, calls)

            task.add_done_callback(done)
            return True
        self._pending.fail(LOST, queue)
        return False


class AsyncServerProxy:
    """The functions of one server: ``await server.add(1, 2)``,
    ``await server.add(a=1, b=2)``, ``await server.call("stats.mean", [1, 2])``."""

    def __init__(self, proxy: AsyncProxy, server_id: str, timeout: float) -> None:
        self._proxy = proxy
        self._server_id = server_id
        self._timeout = _positive(timeout)

    @property
    def server_id(self) -> str:
        return self._server_id

    @property
    def timeout(self) -> float:
        return self._timeout

    async def call(self, func: str, /, *args: Any, **kwargs: Any) -> Any:
        """Calls ``func`` with positional and keyword arguments; the way to
        call a function whose name is not a Python identifier. ``func`` is
        positional only, so a function may take keyword arguments named
        ``func`` or ``self``."""
        return await self._proxy.call(self._server_id, func, args, kwargs, timeout=self._timeout)

    async def describe(self) -> Dict[str, Any]:
        """The server's functions with their signatures, and its version."""
        described: Dict[str, Any] = await self.call(DESCRIBE)
        return described

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        if name.startswith("_"):
            raise AttributeError(name)
        return partial(self.call, name)

    def __repr__(self) -> str:
        return f"<AsyncServerProxy {self._server_id!r} timeout={self._timeout:g}>"


#: How long closing a proxy waits for the reply queues being drained to be
#: deleted (seconds); the broker deletes those left once they expire.
_DRAINS_END_WITHIN = 2.0

#: The longest exchange name pamqp (2.3 and 3.x) writes in a publish; AMQP
#: allows 255 bytes, as the Rust client does.
MAX_EXCHANGE_NAME = 127

#: The longest a call waits: a longer timeout, ``math.inf`` included, is
#: taken as this (a hundred years).
MAX_TIMEOUT = 100 * 365 * 24 * 3600.0


def _cancellations(task: "asyncio.Task[Any]") -> int:
    """The cancellations asked of ``task`` and not taken back, which
    Python 3.11 and later count: one more than before the call is its
    timer's, more is someone else's. Earlier versions cannot tell (0
    always), and the timer's reading wins."""
    cancelling = getattr(task, "cancelling", None)
    return 0 if cancelling is None else int(cancelling())


def _positive(timeout: float) -> float:
    try:
        timeout = float(timeout)
    except OverflowError:
        # An int past float's range: as long as can be, if positive.
        timeout = math.inf if timeout > 0 else -math.inf
    if not timeout > 0:
        raise ValueError(f"a timeout is a positive number of seconds, not {timeout!r}")
    return min(timeout, MAX_TIMEOUT)


def _byte_limit(name: str, value: int) -> int:
    """``value``, checked as a limit in bytes called ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, not {value!r}")
    return value
