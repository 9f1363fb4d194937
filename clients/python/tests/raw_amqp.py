"""A message no AMQP client of the proxy can read, published with a socket of its own.

Every AMQP library refuses to write a short string that is not UTF-8, so
this writes the frames itself (with pamqp, which aio-pika's aiormq reads
them with): a content header whose ``message_id`` is the bytes
``b"\\xff\\xfe"`` and more. aiormq cannot decode it, and gives up the
connection that receives it, as lapin does for the Rust proxy.
"""

from __future__ import annotations

import socket
from urllib.parse import unquote, urlsplit

from pamqp import commands, frame, header
from pamqp.body import ContentBody
from pamqp.exceptions import UnmarshalingException

__all__ = ["publish_unreadable"]

#: Written in place of a placeholder of the same length, once marshalled.
_PLACEHOLDER = b"callme-not-utf8-id"
_UNREADABLE = b"\xff\xfe" + b" not UTF-8 here!"
assert len(_PLACEHOLDER) == len(_UNREADABLE)


def publish_unreadable(amqp_url: str, exchange: str) -> None:
    """Publishes to ``exchange`` (routing key ``""``) a message whose
    ``message_id`` is not UTF-8; returns once the broker has routed it."""
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
        sock.sendall(
            frame.marshal(commands.Basic.Publish(exchange=exchange, routing_key=""), 1)
            + marshalled.replace(_PLACEHOLDER, _UNREADABLE)
            + frame.marshal(ContentBody(body), 1)
        )
        # The broker handles a connection's frames in order: once the
        # close is answered, the message was routed.
        wire.send(0, commands.Connection.Close(reply_code=200, reply_text="done", class_id=0, method_id=0))
        wire.expect(commands.Connection.CloseOk)


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
