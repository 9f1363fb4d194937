"""The wire format: request and response bodies, and the broker's names.

What docs/protocol.md of the callme repository specifies, and nothing of
the transport: a request is ``{"func", "args", "kwargs"}`` as UTF-8 JSON,
a response ``{"result": ...}`` or ``{"error": {"type", "message",
"data"}}``.
"""

from __future__ import annotations

import json
import re
from typing import Any, Dict, Mapping, Optional, Sequence

from .errors import remote_error

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_MAX_REPLY_BYTES",
    "DEFAULT_MAX_REQUEST_BYTES",
    "DESCRIBE",
    "REPLY_QUEUE",
    "MAX_NAME_BYTES",
    "check_reply_user",
    "client_exchange",
    "client_queue",
    "encode_request",
    "decode_response",
    "server_exchange",
    "valid_server_id",
]

CONTENT_TYPE = "application/json"

#: The reserved function every server answers with its description.
DESCRIBE = "_describe"

#: The request header naming the caller's reply queue, so a busy server
#: can pipeline its replies there by the default exchange
#: (docs/protocol.md, "Pipelined replies").
REPLY_QUEUE = "x-callme-reply-queue"

#: The largest reply body a proxy takes unless told otherwise
#: (``max_reply_bytes``): 16 MiB, a plugin's default largest result and
#: RabbitMQ 4.x's default ``max_message_size``.
DEFAULT_MAX_REPLY_BYTES = 16 * 1024 * 1024

#: The largest request body a proxy sends unless told otherwise
#: (``max_request_bytes``): 16 MiB, RabbitMQ 4.x's default
#: ``max_message_size``, as the Rust proxy.
DEFAULT_MAX_REQUEST_BYTES = 16 * 1024 * 1024

# What each JSON object and array of a reply counts against its size
# limit, as the host counts them in requests (docs/protocol.md): a body of
# tiny objects (``{},``) would otherwise take some 25 times its size once
# parsed, of tiny arrays about 20 times, before anything in it is checked.
_BYTES_PER_OBJECT = 32
_BYTES_PER_ARRAY = 8
# Objects a reply may always hold, however small its limit.
_MIN_OBJECTS = 1024

# A JSON string, escapes and all: what the braces inside are not counted in.
# One never closed runs to the end of the body (which is then no JSON):
# required to close, the pattern was tried again from each quote inside
# it, a time that grows with the square of the body's length.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)

# Server ids are limited to these characters; the broker's exchange names
# are built from them and are at most 255 bytes.
_SERVER_ID = re.compile(r"[A-Za-z0-9_.\-]{1,200}")


def valid_server_id(server_id: str) -> bool:
    """Whether ``server_id`` is one a server can have."""
    return _SERVER_ID.fullmatch(server_id) is not None


def readable_in_error(exchange: str, vhost: str, user: str) -> bool:
    """Whether every error the broker could send about a publish to
    ``exchange`` as ``user`` on ``vhost`` can be read.

    Such an error names the exchange, the vhost and, for a refusal, the
    user (``ACCESS_REFUSED - write access to exchange 'NAME' in vhost
    'VHOST' refused for user 'USER'``; the longest prefix is 55 bytes), and
    RabbitMQ cuts a text longer than 255 bytes at byte 252
    (``rabbit_binary_generator``, 3.x and 4.x), whatever character that
    splits. A text that is not UTF-8 is a frame the AMQP library cannot
    read, which ends the connection, and every call on it. So: always
    when all three are ASCII, otherwise only when the longest text fits
    whole. The Rust client's rule (``amqp/echo.rs``).
    """
    if exchange.isascii() and vhost.isascii() and user.isascii():
        return True
    size = len(exchange.encode()) + len(vhost.encode()) + len(user.encode())
    return _ERROR_BEFORE + size + _ERROR_AFTER <= 255


#: Room for what comes before an exchange's name in a broker's error.
_ERROR_BEFORE = 64
#: What comes after it besides the vhost and the user.
_ERROR_AFTER = len("' in vhost '") + len("' refused for user '") + len("'")


def server_exchange(server_id: str) -> str:
    """The exchange requests for ``server_id`` are published to."""
    return f"server_{server_id}_ex"


def client_exchange(user: str, uid: str) -> str:
    """The reply exchange of a proxy of broker user ``user``, unique by
    ``uid``: ``user`` as it is, whatever its characters, as the Rust
    proxy names it."""
    return f"client_{user}_ex_{uid}"


def client_queue(user: str, uid: str) -> str:
    """The reply queue bound to :func:`client_exchange`."""
    return f"client_{user}_queue_{uid}"


#: The longest name AMQP (and RabbitMQ) takes, in bytes of UTF-8.
MAX_NAME_BYTES = 255


def check_reply_user(user: str) -> None:
    """Raises ``ValueError`` when the reply names of broker user ``user``
    (``client_USER_queue_UUID`` the longer) are over :data:`MAX_NAME_BYTES`,
    as the Rust proxy does."""
    size = len(user.encode())
    longest = len(client_queue(user, "0" * 36).encode())
    if longest > MAX_NAME_BYTES:
        raise ValueError(
            f"the broker user name is {size} bytes: callme's reply names (client_USER_queue_ID) "
            f"must fit AMQP's {MAX_NAME_BYTES} bytes, so it may have at most "
            f"{size - (longest - MAX_NAME_BYTES)}"
        )


def encode_request(
    func: str, args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None
) -> bytes:
    """The body of a request.

    :raises TypeError: when ``args`` is not a list or tuple (a string
        would go as its characters, a dict as its keys), ``kwargs`` not a
        mapping with string keys, or an argument is not JSON-serialisable.
    """
    if args is None:
        args = ()
    if not isinstance(args, (list, tuple)):
        raise TypeError(
            f"the positional arguments must be a list or a tuple, not {type(args).__name__}"
        )
    if kwargs is not None and not (
        isinstance(kwargs, Mapping) and all(isinstance(k, str) for k in kwargs)
    ):
        raise TypeError("the keyword arguments must be a mapping with string keys")
    request: Dict[str, Any] = {"func": func}
    if args:
        request["args"] = list(args)
    if kwargs:
        request["kwargs"] = dict(kwargs)
    return json.dumps(request, separators=(",", ":"), allow_nan=False).encode()


def _unique_keys(pairs: "list[tuple[str, Any]]") -> "dict[str, Any]":
    found: "dict[str, Any]" = {}
    for key, value in pairs:
        if key in found:
            raise ValueError(f"a response names the key {key[:100]!r} twice")
        found[key] = value
    return found


def _not_json(constant: str) -> Any:
    raise ValueError(f"a response holds {constant}, which is not JSON")


def reply_refusal(body: bytes, max_bytes: int) -> Optional[str]:
    """Why a reply body is not taken under a limit of ``max_bytes``, if it
    is not: it is larger, or holds more JSON objects and arrays than a
    body of that size may."""
    if len(body) > max_bytes:
        return f"the reply is {len(body)} bytes, the limit is {max_bytes}"
    allowed = max(max_bytes // _BYTES_PER_OBJECT, _MIN_OBJECTS) * _BYTES_PER_OBJECT

    def used(text: bytes) -> "tuple[int, int, int]":
        objects, arrays = text.count(b"{"), text.count(b"[")
        return objects, arrays, objects * _BYTES_PER_OBJECT + arrays * _BYTES_PER_ARRAY

    # Braces in strings counted too: an upper bound, exact when it passes.
    if used(body)[2] <= allowed:
        return None
    objects, arrays, counted = used(_STRING.sub(b"", body))
    if counted <= allowed:
        return None
    return (
        f"the reply holds {objects} JSON objects and {arrays} arrays, more than its size "
        f"limit allows: each object counts {_BYTES_PER_OBJECT} bytes and each array "
        f"{_BYTES_PER_ARRAY} against {allowed} (the limit, {max_bytes} bytes, or "
        f"{_MIN_OBJECTS} objects at least)"
    )


def decode_response(body: bytes, max_bytes: int = DEFAULT_MAX_REPLY_BYTES) -> Any:
    """The result a response body carries, if it is within ``max_bytes``
    (see :func:`reply_refusal`).

    :raises RemoteError: (a subclass per ``type``) when it carries an
        error; :class:`Internal` when it is over its limit, and not read.
    :raises ValueError: when it is not a response.
    """
    refusal = reply_refusal(body, max_bytes)
    if refusal is not None:
        raise remote_error("Internal", f"reply not taken: {refusal} (max_reply_bytes)")
    try:
        # As strict as the host reads requests (I-JSON, RFC 7493): a key
        # given twice, or NaN and Infinity, which are not JSON, make no
        # response.
        response = json.loads(body, object_pairs_hook=_unique_keys, parse_constant=_not_json)
    except RecursionError:
        raise ValueError("a response nested too deeply") from None
    if not isinstance(response, dict):
        raise ValueError("a response is a JSON object")
    if "error" in response:
        if "result" in response:
            raise ValueError("a response has a `result` or an `error`, not both")
        error = response["error"]
        if not isinstance(error, dict):
            raise ValueError("a response's `error` is a JSON object")
        raise remote_error(
            str(error.get("type", "Internal")),
            str(error.get("message", "")),
            error.get("data"),
        )
    if "result" not in response:
        raise ValueError("a response has a `result` or an `error`")
    return response["result"]
