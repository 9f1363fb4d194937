"""The blocking proxy of the seed's API, safe to share between threads.

:class:`Proxy` runs an :class:`AsyncProxy` on an event loop of its own, in
a daemon thread, and hands each call to it: any number of threads can call
through one proxy at once, and their calls are multiplexed on its one
connection. Closing the proxy (or the end of the program) closes the
connection and stops the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import weakref
from functools import partial
from typing import Any, Callable, Coroutine, Dict, Mapping, Optional, Sequence, TypeVar

from . import errors
from .async_proxy import DEFAULT_TIMEOUT, AsyncProxy, _positive
from .protocol import DESCRIBE

__all__ = ["Proxy", "ServerProxy"]

T = TypeVar("T")


class _LoopThread:
    """An event loop running in a daemon thread."""

    def __init__(self) -> None:
        self.closed = False
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="callme-proxy", daemon=True
        )
        self._thread.start()

    def is_current(self) -> bool:
        return threading.current_thread() is self._thread

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self.is_current():
            coroutine.close()
            raise RuntimeError("a blocking Proxy cannot be called from its own event loop")
        if self.closed:
            coroutine.close()
            raise errors.ConnectionError("the proxy is closed")
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        except RuntimeError:  # the loop closed meanwhile
            coroutine.close()
            raise errors.ConnectionError("the proxy is closed") from None
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise errors.ConnectionError("the proxy was closed") from None
        except BaseException as e:
            # KeyboardInterrupt in the caller: the call is abandoned.
            if not isinstance(e, Exception):
                future.cancel()
            raise

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self.loop.close()


def _shut_down(thread: _LoopThread, proxy: AsyncProxy) -> None:
    thread.closed = True
    if thread.loop.is_closed() or not thread.loop.is_running():
        return
    if thread.is_current():
        # Collected on its own loop's thread: that loop cannot be waited for here.
        async def close_and_stop() -> None:
            await _close(proxy)
            thread.loop.stop()

        thread.loop.create_task(close_and_stop())
        return
    try:
        future = asyncio.run_coroutine_threadsafe(_close(proxy), thread.loop)
        future.result(timeout=10)
    except Exception:  # at exit, a broker that is gone cannot be said goodbye to
        pass
    thread.stop()


async def _close(proxy: AsyncProxy) -> None:
    """Closes ``proxy``, then ends every call still running on its loop, so
    no thread waits for a loop that has stopped."""
    await proxy.close()
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
        timeout: float = DEFAULT_TIMEOUT,
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
    ) -> None:
        self._async = AsyncProxy(
            amqp_url,
            timeout,
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
        self._thread = _LoopThread()
        self._finalizer = weakref.finalize(self, _shut_down, self._thread, self._async)
        try:
            self._thread.run(self._async.connect())
        except BaseException:
            self._finalizer()
            raise

    @property
    def timeout(self) -> float:
        """The timeout (seconds) of calls that do not set one."""
        return self._async.timeout

    @property
    def reply_exchange(self) -> Optional[str]:
        """The exchange this proxy receives replies on."""
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
        return self._thread.run(
            self._async.call(server_id, func, args, kwargs, timeout=timeout)
        )

    def close(self) -> None:
        """Closes the connection and stops the proxy's thread."""
        self._finalizer()

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

    def call(self, func: str, *args: Any, **kwargs: Any) -> Any:
        """Calls ``func`` with positional and keyword arguments; the way to
        call a function whose name is not a Python identifier."""
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
