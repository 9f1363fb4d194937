"""A Python client for callme: RPC over AMQP (RabbitMQ) to callme servers.

The seed's API::

    import callme_client as callme

    proxy = callme.Proxy(amqp_url="amqp://guest:guest@localhost:5672/%2f")
    print(proxy.use_server("fooserver").add(1, 1))

# Layout

- ``proxy``: :class:`Proxy`, the blocking proxy, shared by threads;
- ``async_proxy``: :class:`AsyncProxy`, the same for asyncio code;
- ``link``: the connection and reply queue, across reconnections;
- ``publisher``: requests published one per channel, with confirms;
- ``protocol``: request and response bodies, the broker's names;
- ``options``: the broker URL, the seed's arguments, TLS;
- ``errors``: the exceptions.
"""

from .async_proxy import DEFAULT_TIMEOUT, AsyncProxy, AsyncServerProxy
from .errors import (
    AccessRefused,
    BadRequest,
    CallmeError,
    ConnectionError,
    GuestError,
    Internal,
    InvalidArguments,
    MemoryLimit,
    NoSuchFunction,
    NoSuchServer,
    Rejected,
    TooLarge,
    RemoteError,
    RemoteTimeout,
    Timeout,
    Trap,
)
from .options import redact_url
from .protocol import DEFAULT_MAX_REPLY_BYTES, DEFAULT_MAX_REQUEST_BYTES
from .proxy import Proxy, ServerProxy

__version__ = "0.1.0"

__all__ = [
    "Proxy",
    "ServerProxy",
    "AsyncProxy",
    "AsyncServerProxy",
    "DEFAULT_TIMEOUT",
    "DEFAULT_MAX_REPLY_BYTES",
    "DEFAULT_MAX_REQUEST_BYTES",
    "CallmeError",
    "Timeout",
    "NoSuchServer",
    "AccessRefused",
    "ConnectionError",
    "Rejected",
    "TooLarge",
    "RemoteError",
    "NoSuchFunction",
    "InvalidArguments",
    "RemoteTimeout",
    "MemoryLimit",
    "Trap",
    "GuestError",
    "BadRequest",
    "Internal",
    "redact_url",
    "__version__",
]
