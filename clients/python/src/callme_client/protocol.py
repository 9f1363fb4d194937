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
    "DESCRIBE",
    "REPLY_QUEUE",
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

# Server ids are limited to these characters; the broker's exchange names
# are built from them and are at most 255 bytes.
_SERVER_ID = re.compile(r"[A-Za-z0-9_.\-]{1,200}")


def valid_server_id(server_id: str) -> bool:
    """Whether ``server_id`` is one a server can have."""
    return _SERVER_ID.fullmatch(server_id) is not None


def server_exchange(server_id: str) -> str:
    """The exchange requests for ``server_id`` are published to."""
    return f"server_{server_id}_ex"


def encode_request(
    func: str, args: Sequence[Any] = (), kwargs: Optional[Mapping[str, Any]] = None
) -> bytes:
    """The body of a request.

    :raises TypeError: when an argument is not JSON-serialisable.
    """
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


def decode_response(body: bytes) -> Any:
    """The result a response body carries.

    :raises RemoteError: (a subclass per ``type``) when it carries an error.
    :raises ValueError: when it is not a response.
    """
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
