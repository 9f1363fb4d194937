"""Exceptions a call can raise.

Every exception is a :class:`CallmeError`. Failures on the caller's side
(:class:`Timeout`, :class:`NoSuchServer`, :class:`AccessRefused`,
:class:`ConnectionError`) are told apart from errors the server answered
with (:class:`RemoteError` and one subclass per remote ``type``). A remote
``Timeout`` (the call spent its fuel or passed its deadline on the server)
is a :class:`RemoteTimeout`, which is also a :class:`Timeout`, so one
``except callme_client.Timeout`` catches a call that took too long on
either side.
"""

from __future__ import annotations

import builtins
from typing import Any, Dict, Tuple, Type

__all__ = [
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
]


class CallmeError(Exception):
    """The base of every error this package raises."""


class Timeout(CallmeError):
    """No reply came within the call's timeout."""


class NoSuchServer(CallmeError):
    """Nothing serves this server id: the broker could not route the request."""

    def __init__(self, server_id: str) -> None:
        super().__init__(f"no server serves the id {server_id!r}")
        self.server_id = server_id


class AccessRefused(CallmeError):
    """The broker refused the login, the virtual host, or a publish to the
    server's exchange (permissions)."""


class ConnectionError(CallmeError, builtins.ConnectionError):
    """The broker could not be reached, or the connection was lost before
    the reply came. Also a built-in :class:`ConnectionError`."""


class Rejected(CallmeError):
    """The broker took the request but refused it (a negative publisher
    confirm), for example because a queue is over its length limit."""


class TooLarge(CallmeError):
    """The request is too large: over the proxy's ``max_request_bytes``
    (16 MiB by default), refused before it was sent, or refused by the
    broker (over its ``max_message_size``: 16 MiB by default in RabbitMQ
    4.x, 128 MiB in 3.x). Sending it again would fail again."""


class RemoteError(CallmeError):
    """The server answered with an error.

    ``type`` is the server's error type (``"GuestError"``,
    ``"InvalidArguments"``, ...), ``message`` its text and ``data`` its
    payload (the plugin's error value for a ``GuestError``, ``"fuel"`` or
    ``"deadline"`` for a ``Timeout``, else usually ``None``).
    """

    def __init__(self, type: str, message: str, data: Any = None) -> None:
        super().__init__(f"{type}: {message}")
        self.type = type
        self.message = message
        self.data = data

    def __reduce__(self) -> Any:
        return (type(self), (self.type, self.message, self.data))


class NoSuchFunction(RemoteError):
    """The server has no function of that name."""


class InvalidArguments(RemoteError):
    """Wrong arity, an unknown keyword, a wrong type or a value out of range."""


class RemoteTimeout(RemoteError, Timeout):
    """The call spent its fuel or passed its deadline on the server
    (``data`` says which)."""


class MemoryLimit(RemoteError):
    """The call hit its memory cap, or its result the size cap."""


class Trap(RemoteError):
    """The plugin trapped (panic, abort, stack overflow)."""


class GuestError(RemoteError):
    """The function returned an error value; ``data`` holds it."""


class BadRequest(RemoteError):
    """The server could not read the request."""


class Internal(RemoteError):
    """The server failed for a reason of its own."""


_REMOTE: Dict[str, Type[RemoteError]] = {
    "NoSuchFunction": NoSuchFunction,
    "InvalidArguments": InvalidArguments,
    "Timeout": RemoteTimeout,
    "MemoryLimit": MemoryLimit,
    "Trap": Trap,
    "GuestError": GuestError,
    "BadRequest": BadRequest,
    "Internal": Internal,
}


def ended_without_error(e: BaseException) -> bool:
    """Whether ``e`` is what aiormq (6 and 7) fails everything waiting on
    a connection with when the connection ended without an error of its
    own (its reader found the socket's end between two frames, and closed
    it as if asked to): a bare ``Exception``."""
    return type(e) is Exception


def reply_text(e: BaseException) -> str:
    """The text of an AMQP library error: the broker's reply text when it
    has one (``args`` of ``(code, text)``), else its message."""
    args: Tuple[Any, ...] = tuple(getattr(e, "args", ()))
    if len(args) >= 2 and isinstance(args[1], str):
        return args[1]
    # A `Connection.Close` frame where another was expected (aiormq 6).
    for arg in args:
        text = getattr(arg, "reply_text", None)
        if isinstance(text, str) and text:
            return text
    return str(e) or type(e).__name__


def remote_error(type: str, message: str, data: Any = None) -> RemoteError:
    """The exception for an error reply: a subclass of :class:`RemoteError`
    for the types the protocol names, :class:`RemoteError` itself for a
    type a later server may add."""
    return _REMOTE.get(type, RemoteError)(type, message, data)
