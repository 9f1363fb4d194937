"""The blocking proxy of the seed's API, safe to share between threads.

:class:`Proxy` runs an :class:`AsyncProxy` on an event loop of its own.
A call made while no other is running runs the loop in the calling
thread until it is done: a single-threaded caller never waits for
another thread to wake up. A call made while the loop is busy with
another is handed to the proxy's daemon thread, which runs the loop for
as long as handed calls are in flight, multiplexed on the one
connection; their threads wait for their results. While nobody calls,
the daemon thread runs the loop a few times a second, so the connection
keeps its heartbeats and reconnects. Closing the proxy (or the end of
the program) closes the connection and stops the thread.

A Ctrl-C while the main thread runs the loop for its call cancels that
call and raises ``KeyboardInterrupt`` once the loop is left (as
``asyncio.run`` does), rather than in whichever of the loop's tasks runs
at that instant: there it could end aiormq's reader (and the connection,
every call of every thread on it) or the task that reconnects.

A process forked from one holding a proxy (``os.fork()``, the ``fork``
start method of :mod:`multiprocessing`, pre-forking servers) shares the
parent's socket and its event loop's epoll instance. The child never
touches them: at the fork it sets the parent's connection aside, never to
be used, closed or collected there, and its first call opens a
connection of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib
import inspect
import os
import signal
import threading
import time
import weakref
from functools import partial
from types import FrameType
from typing import Any, Callable, Coroutine, Dict, Mapping, Optional, Sequence, TypeVar

# What `signal` wraps, without its conversions of handlers to enums,
# which cost microseconds on each call; `signal` itself where it is not.
_signals: Any = signal
try:
    _signals = importlib.import_module("_signal")
except ImportError:
    pass

from . import errors
from .async_proxy import DEFAULT_TIMEOUT, AsyncProxy, _positive
from .protocol import DEFAULT_MAX_REPLY_BYTES, DEFAULT_MAX_REQUEST_BYTES, DESCRIBE

__all__ = ["Proxy", "ServerProxy"]

T = TypeVar("T")

#: How often the loop runs while no thread calls (seconds): often enough
#: for heartbeats (RabbitMQ's default is a minute) and for reconnecting
#: soon after a broker comes back.
IDLE_TICK = 0.2


#: How often the proxy's thread looks whether a reconnection it runs the
#: loop for is done (seconds).
_RECONNECT_LOOK = 0.01

#: At most this many passes of the loop settle it.
_SETTLE_PASSES = 16


#: How often a call handed to the proxy's thread looks whether the loop
#: was closed under it (seconds).
_HANDED_LOOK = 0.5

#: How long closing a proxy waits for its connection to close (seconds),
#: and for what it cancels then to end, at most, besides.
_CLOSE_WITHIN = 10.0
_CLOSE_SLACK = 5.0


class _CtrlC:
    """While the main thread runs the loop for a call, SIGINT cancels
    that call (:attr:`task`) instead of raising ``KeyboardInterrupt``
    wherever the loop is; :meth:`restore` raises it once the loop is
    left. A second SIGINT more than :data:`_SECOND_CTRL_C` after the
    first raises at once, wherever the loop is, as a way out of a call
    the first did not end. Only when SIGINT has Python's default
    handler: one the program set is left alone.

    Used as ``try: install() ... finally: restore()``, with ``install``
    inside the ``try``: a handler of another signal raising just after
    the swap must not leave this one in place."""

    __slots__ = ("loop", "task", "fired", "_fired_at", "_active", "_handler")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.task: "Optional[asyncio.Task[Any]]" = None
        self.fired = False
        self._fired_at = 0.0
        self._active = False
        # The bound method, made once: what is installed, and looked for
        # when it is taken out.
        self._handler = self._on_sigint

    def install(self) -> None:
        if (threading.current_thread() is threading.main_thread()
                and _signals.getsignal(signal.SIGINT) is signal.default_int_handler):
            self._active = True
            _signals.signal(signal.SIGINT, self._handler)

    def restore(self) -> None:
        """Puts Python's handler back, unless the program set one of its
        own meanwhile; raises ``KeyboardInterrupt`` if SIGINT came."""
        if self._active:
            self._active = False
            _take_out(self._handler)
        # Pressed after the call was done with: raised all the same.
        self.raise_if_fired()

    def _on_sigint(self, signum: int, frame: Optional[FrameType]) -> None:
        # Runs in the main thread, between two steps of whatever it runs.
        if not self._active:
            # Left in place by an exit no one foresaw: Python's own again.
            _take_out(self._handler)
            raise KeyboardInterrupt
        now = time.monotonic()
        if self.fired and now - self._fired_at > _SECOND_CTRL_C:
            raise KeyboardInterrupt
        if not self.fired:
            self.fired, self._fired_at = True, now
        if self.task is not None and not self.task.done():
            self.task.cancel()
        try:
            # Wakes the loop if it waits for I/O.
            self.loop.call_soon_threadsafe(_nothing)
        except RuntimeError:  # closed
            pass

    def arm(self, task: "asyncio.Task[Any]") -> None:
        """``task`` is the call's: SIGINT cancels it, and one that came
        before it was made cancels it now."""
        self.task = task
        if self.fired:
            task.cancel()

    def raise_if_fired(self) -> None:
        if self.fired:
            self.fired = False
            raise KeyboardInterrupt


#: How long after a first SIGINT a second one raises at once (seconds):
#: bursts from a held key or a test stay cancels.
_SECOND_CTRL_C = 0.5


def _take_out(handler: Any) -> None:
    """Puts Python's SIGINT handler back if ``handler`` is the one in
    place. Changing a handler first runs those of signals pending, and
    one of them may raise: the change is then made again before that
    goes on."""
    try:
        if _signals.getsignal(signal.SIGINT) is handler:
            _signals.signal(signal.SIGINT, signal.default_int_handler)
    except BaseException:
        if _signals.getsignal(signal.SIGINT) is handler:
            _signals.signal(signal.SIGINT, signal.default_int_handler)
        raise


def _sigint_of_a_call(handler: Any) -> bool:
    """Whether ``handler`` is a call's guard."""
    return isinstance(getattr(handler, "__self__", None), _CtrlC)


def _nothing() -> None:
    pass


def _never() -> bool:
    return False


async def _run_while(condition: Callable[[], bool], limit: float) -> None:
    """Returns once ``condition()`` is false, or after ``limit`` seconds;
    the loop meanwhile runs."""
    deadline = time.monotonic() + limit
    while condition() and time.monotonic() < deadline:
        await asyncio.sleep(_RECONNECT_LOOK)


class _SharedLoop:
    """An event loop run by one thread at a time, the holder of ``_turn``:
    a caller whose call is the only one, else the daemon thread."""

    def __init__(self) -> None:
        self.closed = False
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        # Reentrant: a signal handler (or a finalizer) that interrupts its
        # thread's call after the turn is taken, and before the loop runs,
        # takes the turn again and runs its own call on the loop. Waiting
        # for it, it would wait for ever for a turn only its own thread
        # can give back.
        self._turn = threading.RLock()
        # How deep the calls holding ``_turn`` are nested in one thread.
        self._depth = 0
        # The thread holding ``_turn`` (its ``threading.get_ident()``).
        self._holder: Optional[int] = None
        # A close asked for by the holder of ``_turn`` from within its own
        # call (a signal handler, say), run when that turn ends.
        self._closing: "Optional[asyncio.Task[None]]" = None
        # Calls handed to the daemon thread and not yet done, and whether
        # it should stop; guarded by the condition.
        self._state = threading.Condition()
        self._handed = 0
        self._stopped = False
        # What the daemon thread awaits while it drains handed calls.
        self._waker: "Optional[asyncio.Future[None]]" = None
        # When a thread last ran the loop (time.monotonic()).
        self._last_ran = time.monotonic()
        # Whether the proxy waits for its connection to be made again (set
        # by the proxy once it has one).
        self.reconnecting: Callable[[], bool] = _never
        self._driver = threading.Thread(target=self._drive, name="callme-proxy", daemon=True)
        self._driver.start()

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        running = _running_loop()
        if running is self.loop:
            coroutine.close()
            raise RuntimeError("a blocking Proxy cannot be called from its own event loop")
        if running is not None:
            # It would block that loop, or fail half-way with the call
            # still queued: refused before anything is sent.
            coroutine.close()
            raise RuntimeError(
                "a blocking Proxy cannot be called from a running event loop: use AsyncProxy"
            )
        if self.closed:
            coroutine.close()
            raise errors.ConnectionError("the proxy is closed")
        # Before the turn is taken: a Ctrl-C between taking it and the
        # ``try`` that gives it back would keep it for ever.
        ctrl_c = _CtrlC(self.loop)
        handed: "Optional[concurrent.futures.Future[T]]" = None
        try:
            ctrl_c.install()
            if self._turn.acquire(blocking=False):
                # Nobody runs the loop (or this thread holds the turn and
                # does not run it: a signal handler interrupting its own
                # call): run the call on it here.
                self._depth += 1
                self._holder = threading.get_ident()
                settled: Optional[Coroutine[Any, Any, T]] = None
                try:
                    if self.loop.is_closed():
                        raise errors.ConnectionError("the proxy is closed")
                    settled = _settled(self.loop, coroutine)
                    ctrl_c.raise_if_fired()
                    task = self.loop.create_task(settled)
                    # A task cancelled before its first step never starts
                    # ``settled``, which then cannot close ``coroutine``.
                    task.add_done_callback(lambda _: _close_unstarted(coroutine))
                    ctrl_c.arm(task)
                except BaseException:
                    if settled is not None:
                        settled.close()
                    coroutine.close()
                    self._end_turn()
                    if self.loop.is_closed():
                        # Closed by a signal handler that interrupted this.
                        raise errors.ConnectionError("the proxy was closed") from None
                    raise
                try:
                    return self._run_here(task, ctrl_c)
                finally:
                    self._end_turn()
            # Handed over with SIGINT still held back: a Ctrl-C between
            # counting the call as handed and asking to hear when it ends
            # would leave it counted for ever (every later call then
            # handed to the proxy's thread), and the call sent with nobody
            # waiting for it.
            handed = self._hand_over(coroutine)
        finally:
            try:
                ctrl_c.restore()
            except BaseException:
                if handed is not None:
                    handed.cancel()
                raise
        return self._wait_handed(handed, coroutine)

    def _end_turn(self) -> None:
        """Ends this thread's hold of ``_turn``; the outermost one runs a
        close asked for meanwhile."""
        self._depth -= 1
        if self._depth == 0:
            self._last_ran = time.monotonic()
            self._finish_close()
            self._holder = None
        self._turn.release()

    def _finish_close(self) -> None:
        """Runs a close asked for during this thread's turn, and closes
        the loop."""
        closing, self._closing = self._closing, None
        if closing is None or self.loop.is_closed():
            return
        try:
            self.loop.run_until_complete(closing)
        except BaseException:  # a broker that is gone cannot be said goodbye to
            pass
        self.loop.close()

    def _run_here(self, task: "asyncio.Task[T]", ctrl_c: _CtrlC) -> T:
        try:
            done = self.loop.run_until_complete(task)
        except asyncio.CancelledError:
            ctrl_c.raise_if_fired()
            raise errors.ConnectionError("the proxy was closed") from None
        except BaseException:
            # KeyboardInterrupt in the caller (a handler of the program's
            # own), or the loop could not run: the call is abandoned,
            # never left to be sent later.
            if not task.done():
                task.cancel()
            raise
        # Pressed as the call ended: the program asked to stop all the same.
        ctrl_c.raise_if_fired()
        return done

    def _hand_over(self, coroutine: Coroutine[Any, Any, T]) -> "concurrent.futures.Future[T]":
        """Hands the call to the thread that runs the loop; counted as
        handed until it ends."""
        with self._state:
            self._handed += 1
            self._state.notify()
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        except RuntimeError:  # the loop closed meanwhile
            coroutine.close()
            self._handed_done()
            raise errors.ConnectionError("the proxy is closed") from None
        future.add_done_callback(lambda _: self._handed_done())
        return future

    def _wait_handed(
        self, future: "concurrent.futures.Future[T]", coroutine: Coroutine[Any, Any, T]
    ) -> T:
        try:
            # Looked at now and then: a close that ran the loop's last turn
            # just before this was handed over leaves it to nobody.
            while not future.done():
                concurrent.futures.wait([future], timeout=_HANDED_LOOK)
                if not future.done() and self.loop.is_closed():
                    _close_unstarted(coroutine)
                    raise errors.ConnectionError("the proxy was closed") from None
            return future.result()
        except concurrent.futures.CancelledError:
            raise errors.ConnectionError("the proxy was closed") from None
        except BaseException as e:
            if not isinstance(e, Exception):
                future.cancel()
            raise

    def _handed_done(self) -> None:
        with self._state:
            self._handed -= 1
        try:
            self.loop.call_soon_threadsafe(self._wake)
        except RuntimeError:  # closed: nobody drains any more
            pass

    def _wake(self) -> None:
        if self._waker is not None and not self._waker.done():
            self._waker.set_result(None)

    async def _drain(self) -> None:
        """Returns once no handed call is in flight."""
        while True:
            self._waker = self.loop.create_future()
            with self._state:
                if self._handed == 0:
                    return
            await self._waker

    def _drive(self) -> None:
        while True:
            with self._state:
                self._state.wait_for(lambda: self._handed > 0 or self._stopped, IDLE_TICK)
                if self._stopped:
                    return
                busy = self._handed > 0
            if busy:
                self._turn.acquire()
            elif not self._turn.acquire(blocking=False):
                continue  # a caller runs the loop
            elif time.monotonic() - self._last_ran < IDLE_TICK:
                # A caller ran it lately (read once the turn is held: a
                # turn sets it before it ends): nothing waits for this
                # thread, which would only take the loop from the next
                # call (handed over to it, then, rather than run in place).
                self._turn.release()
                continue
            try:
                if self.loop.is_closed():
                    return
                self._depth += 1
                self._holder = threading.get_ident()
                try:
                    if busy:
                        self.loop.run_until_complete(self._drain())
                    else:
                        # What is due (timers, I/O ready now) and what that
                        # makes ready in turn.
                        self.loop.run_until_complete(_settle(self.loop))
                        if self.reconnecting():
                            # A reconnection is a dozen round trips to the
                            # broker (the handshake, the reply queue set up
                            # again): run at one a tick, an idle proxy
                            # would take seconds, and every attempt would
                            # run out a short ``connection_timeout``.
                            self.loop.run_until_complete(
                                _run_while(self.reconnecting, IDLE_TICK)
                            )
                # The thread must never end before the proxy: a close
                # cancels what it drives (CancelledError, not an
                # Exception), and a KeyboardInterrupt meant for the main
                # thread can surface in a task of the loop (aiormq's reader
                # raises it again after its clean-up) while this thread
                # runs it. Neither is this thread's to act on.
                except BaseException:
                    pass
                finally:
                    self._depth -= 1
                    self._last_ran = time.monotonic()
                    # A finalizer run on this thread may have asked.
                    self._finish_close()
                    self._holder = None
            finally:
                self._turn.release()

    def close(self, proxy: AsyncProxy) -> None:
        """Closes ``proxy``, ends every call still running, closes the loop."""
        self.closed = True
        with self._state:
            self._stopped = True
            self._state.notify()
        if self.loop.is_closed():
            return
        if _running_loop() is self.loop:
            # Collected, or closed by a signal handler, while this loop
            # runs, on the thread running it: that thread finishes the job,
            # and closes the loop when its turn ends.
            task = self.loop.create_task(_close(proxy))
            if self._closing is None:
                self._closing = task
            return
        if self._holder == threading.get_ident():
            # Asked for by a signal handler (or a finalizer) interrupting
            # this thread's own call, which holds the loop's turn: waiting
            # for the turn would wait for ever. The close runs as that call
            # goes on (ending it), and the loop closes when its turn ends.
            if self._closing is None:
                self._closing = self.loop.create_task(_close(proxy))
            return
        # Calls running on another thread's turn are cancelled by the
        # close, which ends that turn.
        try:
            closing = asyncio.run_coroutine_threadsafe(_close(proxy), self.loop)
        except RuntimeError:
            return
        if _running_loop() is not None:
            # Another event loop runs in this thread (a close from async
            # code, or the finalizer run there), and this one cannot run
            # while it does: the close runs on a thread of its own, waited
            # for as long as a close may take.
            closer = threading.Thread(
                target=self._run_close, args=(closing,), name="callme-proxy-close", daemon=True
            )
            closer.start()
            closer.join(_CLOSE_WITHIN + _CLOSE_SLACK)
            return
        self._run_close(closing)

    def _run_close(self, closing: "concurrent.futures.Future[None]") -> None:
        """Runs the loop, once this thread has its turn, until ``closing``
        (the proxy's close, handed to the loop) is done; then closes it."""
        with self._turn:
            if self.loop.is_closed():
                return
            # A Ctrl-C meanwhile is raised once the loop is closed, not in
            # one of its tasks, which would leave it open.
            ctrl_c = _CtrlC(self.loop)
            try:
                ctrl_c.install()
                if not closing.done():
                    self.loop.run_until_complete(asyncio.wrap_future(closing, loop=self.loop))
            except Exception:  # at exit, a broker that is gone cannot be said goodbye to
                pass
            finally:
                self.loop.close()
                ctrl_c.restore()


async def _settle(loop: asyncio.AbstractEventLoop) -> None:
    """Runs ``loop`` until nothing is ready to run (or for
    ``_SETTLE_PASSES`` passes): a broker's closing of the connection takes
    a few passes to reach the link (the socket's end read, the reader
    failing, the connection closing, the link told)."""
    for _ in range(_SETTLE_PASSES):
        await asyncio.sleep(0)
        # CPython's queue of callbacks ready to run; without it, every pass.
        if not getattr(loop, "_ready", True):
            return


async def _settled(loop: asyncio.AbstractEventLoop, coroutine: Coroutine[Any, Any, T]) -> T:
    """Runs ``coroutine`` on ``loop`` once the loop has taken in what was
    ready for it. Between two calls nobody runs the loop, so what the
    broker said meanwhile (the end of the connection) waits unread; the
    call's first step would otherwise run before it, and send the request
    on a connection that is going. Settled first, the connection is seen
    as lost (its AMQP reader ended), and the call waits for the next one,
    as calls made while the proxy reconnects do. When nothing was ready it
    costs one pass of the loop (about 3 µs)."""
    try:
        await _settle(loop)
    except BaseException:
        coroutine.close()
        raise
    return await coroutine


def _close_unstarted(coroutine: Coroutine[Any, Any, Any]) -> None:
    """Closes ``coroutine`` if it never ran (handed to a loop that closed
    before it got to it, or its task cancelled before its first step), so
    that it is not reported as never awaited."""
    if inspect.getcoroutinestate(coroutine) == inspect.CORO_CREATED:
        coroutine.close()


def _running_loop() -> Optional[asyncio.AbstractEventLoop]:
    """The event loop running in this thread, if any."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _shut_down(shared: _SharedLoop, proxy: AsyncProxy) -> None:
    if shared.pid != os.getpid():
        # A child forked without the fork handler (by C code): the
        # connection is its parent's, kept and never collected here.
        _INHERITED.append((shared, proxy))
        return
    shared.close(proxy)


#: Every blocking proxy of this process, for the fork handler.
_PROXIES: "weakref.WeakSet[Proxy]" = weakref.WeakSet()

#: The connections and loops a forked child inherited, kept so that they
#: are never collected there: collecting a loop closes it, which takes its
#: file descriptors out of the epoll instance the child shares with its
#: parent, out of the parent's loop too.
_INHERITED: "list[tuple[_SharedLoop, AsyncProxy]]" = []


def _after_fork_in_child() -> None:
    # Forked by another thread while the main thread was in a call: that
    # call's guard is not the child's.
    if _sigint_of_a_call(_signals.getsignal(signal.SIGINT)):
        _signals.signal(signal.SIGINT, signal.default_int_handler)
    for proxy in list(_PROXIES):
        # Another thread of the parent may have held it at the fork.
        proxy._renewing = threading.Lock()
        proxy._set_aside()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


async def _close(proxy: AsyncProxy) -> None:
    """Closes ``proxy``, then ends every call still running on its loop, so
    no thread waits for a call that cannot end."""
    try:
        await asyncio.wait_for(proxy.close(), _CLOSE_WITHIN)
    except Exception:  # at exit, a broker that is gone cannot be said goodbye to
        pass
    current = asyncio.current_task()
    running = [task for task in asyncio.all_tasks() if task is not current]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)


class Proxy:
    """A client of callme servers, as the seed's ``callme.Proxy``.

    ``proxy.use_server("fooserver").add(1, 1)`` calls ``add`` of the server
    ``fooserver``. The arguments are those of :class:`AsyncProxy`; the
    connection is made here, so a broker that cannot be reached, or refuses
    the login, raises :class:`ConnectionError` or :class:`AccessRefused`
    at once.

    One proxy is safe to share between threads.
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
        self._settings: Dict[str, Any] = dict(
            amqp_url=amqp_url,
            timeout=timeout,
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
            max_reply_bytes=max_reply_bytes,
            max_request_bytes=max_request_bytes,
        )
        self._closed = False
        # Guards making a connection in a forked child.
        self._renewing = threading.Lock()
        self._open()
        _PROXIES.add(self)

    def _open(self) -> None:
        """Makes the connection, its loop and its daemon thread; the proxy
        takes them only once connected."""
        connection = AsyncProxy(**self._settings)
        loop = _SharedLoop()
        finalizer = weakref.finalize(self, _shut_down, loop, connection)
        try:
            loop.run(connection.connect())
        except BaseException:
            finalizer()
            raise
        loop.reconnecting = connection._reconnecting
        self._async, self._loop, self._finalizer = connection, loop, finalizer

    def _set_aside(self) -> None:
        """In a forked child, right after the fork: the connection and loop
        are the parent's; they are kept, untouched, and the next call makes
        new ones."""
        if self._finalizer.detach() is not None:
            _INHERITED.append((self._loop, self._async))

    def _current(self) -> "tuple[_SharedLoop, AsyncProxy]":
        """This process's loop and connection, made here if the proxy came
        from the parent of a fork."""
        if self._loop.pid != os.getpid():
            with self._renewing:
                if self._closed:
                    raise errors.ConnectionError("the proxy is closed")
                if self._loop.pid != os.getpid():
                    # Forked without the fork handler (by C code), the
                    # finalizer is still armed: disarmed here.
                    self._set_aside()
                    self._open()
        return self._loop, self._async

    @property
    def timeout(self) -> float:
        """The timeout (seconds) of calls that do not set one."""
        return self._async.timeout

    @property
    def max_reply_bytes(self) -> int:
        """The largest reply (in bytes) this proxy takes."""
        return self._async.max_reply_bytes

    @property
    def max_request_bytes(self) -> int:
        """The largest request (in bytes) this proxy sends."""
        return self._async.max_request_bytes

    @property
    def reply_exchange(self) -> Optional[str]:
        """The exchange this proxy receives replies on; None in a forked
        child until its first call."""
        if self._loop.pid != os.getpid():
            return None
        return self._async.reply_exchange

    def use_server(self, server_id: str, timeout: Optional[float] = None) -> "ServerProxy":
        """A handle on the server ``server_id``; ``timeout`` (seconds)
        overrides the proxy's default for calls made through it."""
        return ServerProxy(self, server_id, self.timeout if timeout is None else timeout)

    def call(
        self,
        server_id: str,
        func: str,
        args: Sequence[Any] = (),
        kwargs: Optional[Mapping[str, Any]] = None,
        *,
        timeout: Optional[float] = None,
    ) -> Any:
        """Calls ``func`` of ``server_id``; see :meth:`AsyncProxy.call` for
        the exceptions."""
        if self._closed:
            raise errors.ConnectionError("the proxy is closed")
        loop, connection = self._current()
        return loop.run(connection.call(server_id, func, args, kwargs, timeout=timeout))

    def close(self) -> None:
        """Closes the connection and stops the proxy's thread, waiting for
        it (in async code too, where the close runs on a thread of its own:
        the proxy's event loop cannot run where another runs). In a forked
        child that has not called yet, there is nothing of its own to close."""
        with self._renewing:
            self._closed = True
            finalizer = self._finalizer
        finalizer()

    def __enter__(self) -> "Proxy":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the class does not have: say how the seed
        # reaches a server's functions.
        raise AttributeError(
            f"{type(self).__name__!r} object has no attribute {name!r}; "
            f"functions are called as proxy.use_server(server_id).{name}(...)"
        )


class ServerProxy:
    """The functions of one server: ``server.add(1, 2)``,
    ``server.add(a=1, b=2)``, ``server.call("stats.mean", [1, 2, 6])``."""

    def __init__(self, proxy: Proxy, server_id: str, timeout: float) -> None:
        self._proxy = proxy
        self._server_id = server_id
        self._timeout = _positive(timeout)

    @property
    def server_id(self) -> str:
        return self._server_id

    @property
    def timeout(self) -> float:
        return self._timeout

    def call(self, func: str, /, *args: Any, **kwargs: Any) -> Any:
        """Calls ``func`` with positional and keyword arguments; the way to
        call a function whose name is not a Python identifier. ``func`` is
        positional only, so a function may take keyword arguments named
        ``func`` or ``self``."""
        return self._proxy.call(self._server_id, func, args, kwargs, timeout=self._timeout)

    def describe(self) -> Dict[str, Any]:
        """The server's functions with their signatures, and its version."""
        described: Dict[str, Any] = self.call(DESCRIBE)
        return described

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        return partial(self.call, name)

    def __repr__(self) -> str:
        return f"<ServerProxy {self._server_id!r} timeout={self._timeout:g}>"
