"""A message no AMQP client of the proxy can read, published with a socket of its own.

Every AMQP library refuses to write a short string that is not UTF-8, so
this writes the frames itself (with pamqp, which aio-pika's aiormq reads
them with): a content header whose ``message_id`` is the bytes
``b"\\xff\\xfe"`` and more. aiormq cannot decode it, and gives up the
connection that receives it, as lapin does for the Rust proxy.
"""

from __future__ import annotations

import socket
import struct
from urllib.parse import unquote, urlsplit

from pamqp import commands, frame, header
from pamqp.body import ContentBody
from pamqp.exceptions import UnmarshalingException

__all__ = ["publish_unreadable", "NOT_UTF8", "NESTED"]

#: Written in place of a placeholder of the same length, once marshalled.
_PLACEHOLDER = b"callme-not-utf8-id"
_UNREADABLE = b"\xff\xfe" + b" not UTF-8 here!"
assert len(_PLACEHOLDER) == len(_UNREADABLE)


#: What makes a message unreadable: a short string that is not UTF-8, or
#: headers nested deeper than pamqp's decoder (which recurses) can go.
NOT_UTF8 = "a message_id not UTF-8"
NESTED = "headers nested 2,000 deep"


def publish_unreadable(amqp_url: str, exchange: str, kind: str = NOT_UTF8) -> None:
    """Publishes to ``exchange`` (routing key ``""``) a message whose
    ``message_id`` is not UTF-8 (or, with ``kind`` :data:`NESTED`, whose
    headers are nested 2,000 tables deep); returns once the broker has
    routed it."""
    parts = urlsplit(amqp_url)
    user = unquote(parts.username or "guest")
    password = unquote(parts.password or "guest")
    vhost = unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
    with socket.create_connection((parts.hostname or "localhost", parts.port or 5672), timeout=10) as sock:
        wire = _Wire(sock)
        sock.sendall(header.ProtocolHeader().marshal())
        wire.expect(commands.Connection.Start)
        wire.send(0, commands.Connection.StartOk(
            client_properties={"connection_name": "callme-client tests: unreadable"},
            mechanism="PLAIN",
            response=f"\0{user}\0{password}",
            locale="en_US",
        ))
        tune = wire.expect(commands.Connection.Tune)
        wire.send(0, commands.Connection.TuneOk(
            channel_max=tune.channel_max, frame_max=tune.frame_max, heartbeat=0
        ))
        wire.send(0, commands.Connection.Open(virtual_host=vhost))
        wire.expect(commands.Connection.OpenOk)
        wire.send(1, commands.Channel.Open())
        wire.expect(commands.Channel.OpenOk)
        body = b'{"result": "unreadable"}'
        content = header.ContentHeader(0, len(body), commands.Basic.Properties(
            content_type="application/json",
            correlation_id="poison",
            message_id=_PLACEHOLDER.decode(),
        ))
        marshalled = frame.marshal(content, 1)
        assert marshalled.count(_PLACEHOLDER) == 1
        if kind == NESTED:
            marshalled = _nested_header(len(body), 2000)
        else:
            marshalled = marshalled.replace(_PLACEHOLDER, _UNREADABLE)
        sock.sendall(
            frame.marshal(commands.Basic.Publish(exchange=exchange, routing_key=""), 1)
            + marshalled
            + frame.marshal(ContentBody(body), 1)
        )
        # The broker handles a connection's frames in order: once the
        # close is answered, the message was routed.
        wire.send(0, commands.Connection.Close(reply_code=200, reply_text="done", class_id=0, method_id=0))
        wire.expect(commands.Connection.CloseOk)


def _nested_header(body_size: int, depth: int) -> bytes:
    """A content header frame on channel 1 whose properties are a content
    type, a correlation id and headers ``{"a": {"a": ... {}}}``, ``depth``
    tables deep. Written by hand: pamqp's encoder recurses too."""
    table = struct.pack(">I", 0)
    for _ in range(depth):
        entry = b"\x01aF" + table
        table = struct.pack(">I", len(entry)) + entry
    content_type = b"application/json"
    correlation_id = b"poison"
    # Property flags (AMQP 0-9-1, basic): content-type, headers, correlation-id.
    flags = (1 << 15) | (1 << 13) | (1 << 10)
    payload = (
        struct.pack(">HHQH", 60, 0, body_size, flags)
        + bytes([len(content_type)]) + content_type
        + table
        + bytes([len(correlation_id)]) + correlation_id
    )
    return struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"


class _Wire:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def send(self, channel: int, value: object) -> None:
        self._sock.sendall(frame.marshal(value, channel))

    def expect(self, kind: type) -> object:
        while True:
            if self._buffer:
                try:
                    used, _, value = frame.unmarshal(self._buffer)
                except UnmarshalingException:
                    pass  # not all of it yet
                else:
                    self._buffer = self._buffer[used:]
                    if isinstance(value, kind):
                        return value
                    raise AssertionError(f"expected {kind.__name__}, the broker sent {value!r}")
            more = self._sock.recv(65536)
            if not more:
                raise AssertionError(f"the broker closed the connection before {kind.__name__}")
            self._buffer += more
