"""A lean blocking client of docs/protocol.md on pamqp over a plain socket,
driven by bench/sequential.py.

Not a client to use: no timeouts, reconnection, errors, TLS or threads,
and it reads only the frames one sequential call brings. It does what
bench/lean_pika.py does per call (a publisher-confirmed, `mandatory`
request and the wait for its reply, on one connection), with pamqp's
framing (the library aiormq builds on) and nothing between it and the
socket: how fast a blocking Python caller could go against the same host
with the least an AMQP layer can do. Runs under the interpreter of a venv
holding pamqp (the client's own, through aio-pika):

    python lean_pamqp.py call SERVER_ID

The broker is ``CALLME_AMQP_URL`` (``amqp://`` only). The worker answers
rounds as worker_rounds.py says.
"""

import json
import os
import socket
import sys
import urllib.parse
import uuid

from pamqp import commands, frame, header
from pamqp.body import ContentBody
from pamqp.exceptions import UnmarshalingException
from worker_rounds import answer_rounds


class Connection:
    """One AMQP connection with one channel (1), read frame by frame."""

    def __init__(self, url):
        parts = urllib.parse.urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port or 5672))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.sock.sendall(frame.marshal(header.ProtocolHeader(), 0))
        self.expect(commands.Connection.Start)
        user = urllib.parse.unquote(parts.username or "guest")
        password = urllib.parse.unquote(parts.password or "guest")
        self.send(0, commands.Connection.StartOk(
            client_properties={"connection_name": "lean pamqp"},
            mechanism="PLAIN",
            response="\0%s\0%s" % (user, password),
        ))
        tune = self.expect(commands.Connection.Tune)
        self.send(0, commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        self.send(0, commands.Connection.Open(virtual_host=vhost))
        self.expect(commands.Connection.OpenOk)
        self.send(1, commands.Channel.Open())
        self.expect(commands.Channel.OpenOk)

    def send(self, channel, *frames):
        self.sock.sendall(b"".join(frame.marshal(f, channel) for f in frames))

    def read(self):
        """The next frame on any channel."""
        while True:
            if self.buffer:
                try:
                    used, _channel, value = frame.unmarshal(self.buffer)
                except UnmarshalingException:
                    pass
                else:
                    self.buffer = self.buffer[used:]
                    return value
            data = self.sock.recv(131072)
            if not data:
                raise SystemExit("the broker closed the connection")
            self.buffer += data

    def expect(self, kind):
        value = self.read()
        if not isinstance(value, kind):
            raise SystemExit("expected %s, got %r" % (kind.__name__, value))
        return value


def call(server_id):
    conn = Connection(os.environ["CALLME_AMQP_URL"])
    exchange = "client_bench_ex_" + uuid.uuid4().hex
    conn.send(1, commands.Exchange.Declare(exchange=exchange, exchange_type="fanout", auto_delete=True))
    conn.expect(commands.Exchange.DeclareOk)
    conn.send(1, commands.Queue.Declare(queue="", exclusive=True))
    queue = conn.expect(commands.Queue.DeclareOk).queue
    conn.send(1, commands.Queue.Bind(queue=queue, exchange=exchange))
    conn.expect(commands.Queue.BindOk)
    conn.send(1, commands.Confirm.Select())
    conn.expect(commands.Confirm.SelectOk)
    conn.send(1, commands.Basic.Consume(queue=queue, no_ack=True))
    conn.expect(commands.Basic.ConsumeOk)
    target = "server_%s_ex" % server_id

    def add(a, b):
        correlation_id = str(uuid.uuid4())
        body = json.dumps({"func": "add", "args": [a, b]}).encode()
        properties = commands.Basic.Properties(
            content_type="application/json",
            correlation_id=correlation_id,
            reply_to=exchange,
            expiration="30000",
            delivery_mode=1,
        )
        conn.send(
            1,
            commands.Basic.Publish(exchange=target, routing_key="", mandatory=True),
            header.ContentHeader(0, len(body), properties),
            ContentBody(body),
        )
        confirmed = reply = None
        while confirmed is None or reply is None:
            value = conn.read()
            if isinstance(value, commands.Basic.Ack):
                confirmed = True
            elif isinstance(value, commands.Basic.Deliver):
                head = conn.read()
                data = conn.read().value if head.body_size else b""
                if head.properties.correlation_id == correlation_id:
                    reply = data
            elif isinstance(value, (commands.Basic.Return, commands.Basic.Nack, commands.Channel.Close)):
                raise SystemExit("the request was not taken: %r" % (value,))
        return json.loads(reply)["result"]

    answer_rounds(add)


if __name__ == "__main__":
    {"call": call}[sys.argv[1]](sys.argv[2])
