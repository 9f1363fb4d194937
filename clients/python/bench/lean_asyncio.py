"""A lean asyncio client of docs/protocol.md on pamqp, driven by
bench/sequential.py.

Not a client to use: no reconnection, errors, TLS or threads. It does per
call what callme_client's blocking ``Proxy`` does for a caller calling
alone (the event loop run in the caller's thread until the call is done,
a timer for the call's timeout, a publisher-confirmed ``mandatory``
request with the client's properties and headers, the wait for its reply
matched by correlation id, replies acknowledged in runs of 16), with
pamqp's framing read in an ``asyncio.Protocol``'s ``data_received``
instead of aiormq's reader and writer tasks and channel queues: how fast
a client built on asyncio could go against the same host. Runs under the
interpreter of a venv holding pamqp (the client's own, through aio-pika):

    python lean_asyncio.py call SERVER_ID

The broker is ``CALLME_AMQP_URL`` (``amqp://`` only). The worker answers
rounds as worker_rounds.py says.
"""

import asyncio
import datetime
import json
import os
import secrets
import sys
import time
import urllib.parse
import uuid

from pamqp import commands, frame, header
from pamqp.body import ContentBody
from pamqp.exceptions import UnmarshalingException
from worker_rounds import answer_rounds


class Wire(asyncio.Protocol):
    """One AMQP connection; frames are handed to ``on_frame`` as they come."""

    def __init__(self):
        self.buffer = b""
        self.transport = None
        self.waiting = []  # (kind, future), for the set-up's replies
        self.on_frame = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buffer = self.buffer + data if self.buffer else data
        while self.buffer:
            try:
                used, channel, value = frame.unmarshal(self.buffer)
            except UnmarshalingException:
                return
            self.buffer = self.buffer[used:]
            if self.on_frame is not None:
                self.on_frame(value)
            elif self.waiting:
                kind, future = self.waiting.pop(0)
                future.set_result(value)

    def send(self, channel, *frames):
        self.transport.write(b"".join(frame.marshal(f, channel) for f in frames))

    async def expect(self, kind):
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((kind, future))
        value = await future
        if not isinstance(value, kind):
            raise SystemExit("expected %s, got %r" % (kind.__name__, value))
        return value


class Client:
    def __init__(self, loop, url, server_id):
        self.loop = loop
        self.url = url
        self.target = "server_%s_ex" % server_id
        self.pending = {}
        self.confirms = []
        self.sent = 0
        self.unacked = 0
        self.ack_timer = None

    async def connect(self):
        parts = urllib.parse.urlsplit(self.url)
        _, wire = await self.loop.create_connection(Wire, parts.hostname, parts.port or 5672)
        self.wire = wire
        wire.transport.write(frame.marshal(header.ProtocolHeader(), 0))
        await wire.expect(commands.Connection.Start)
        user = urllib.parse.unquote(parts.username or "guest")
        password = urllib.parse.unquote(parts.password or "guest")
        wire.send(0, commands.Connection.StartOk(
            client_properties={"connection_name": "lean asyncio"},
            mechanism="PLAIN", response="\0%s\0%s" % (user, password),
        ))
        tune = await wire.expect(commands.Connection.Tune)
        wire.send(0, commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        vhost = urllib.parse.unquote(parts.path[1:]) if len(parts.path) > 1 else "/"
        wire.send(0, commands.Connection.Open(virtual_host=vhost))
        await wire.expect(commands.Connection.OpenOk)
        for channel in (1, 2):
            wire.send(channel, commands.Channel.Open())
            await wire.expect(commands.Channel.OpenOk)
        self.exchange = "client_bench_ex_" + uuid.uuid4().hex
        wire.send(2, commands.Exchange.Declare(exchange=self.exchange, exchange_type="direct", auto_delete=True))
        await wire.expect(commands.Exchange.DeclareOk)
        wire.send(2, commands.Queue.Declare(queue="", exclusive=True))
        self.queue = (await wire.expect(commands.Queue.DeclareOk)).queue
        wire.send(2, commands.Queue.Bind(queue=self.queue, exchange=self.exchange))
        await wire.expect(commands.Queue.BindOk)
        wire.send(2, commands.Basic.Qos(prefetch_count=64))
        await wire.expect(commands.Basic.QosOk)
        wire.send(2, commands.Basic.Consume(queue=self.queue))
        await wire.expect(commands.Basic.ConsumeOk)
        wire.send(1, commands.Confirm.Select())
        await wire.expect(commands.Confirm.SelectOk)
        self.deliver = None
        self.head = None
        wire.on_frame = self.on_frame

    def on_frame(self, value):
        if isinstance(value, commands.Basic.Ack):
            self.confirms.pop(0).set_result(None)
        elif isinstance(value, commands.Basic.Deliver):
            self.deliver = value
        elif isinstance(value, header.ContentHeader):
            self.head = value
            if value.body_size == 0:
                self.delivered(b"")
        elif isinstance(value, ContentBody):
            self.delivered(value.value)
        elif isinstance(value, (commands.Basic.Return, commands.Basic.Nack, commands.Channel.Close)):
            raise SystemExit("the request was not taken: %r" % (value,))

    def delivered(self, body):
        future = self.pending.get(self.head.properties.correlation_id)
        if future is not None and not future.done():
            future.set_result(body)
        self.unacked = self.deliver.delivery_tag
        self.sent += 1
        if self.sent >= 16:
            self.ack()
        elif self.ack_timer is None:
            self.ack_timer = self.loop.call_later(0.05, self.ack)

    def ack(self):
        if self.ack_timer is not None:
            self.ack_timer.cancel()
            self.ack_timer = None
        self.sent = 0
        self.wire.send(2, commands.Basic.Ack(delivery_tag=self.unacked, multiple=True))

    async def call(self, func, args, timeout=30.0):
        body = json.dumps({"func": func, "args": args}).encode()
        task = asyncio.current_task()
        deadline = self.loop.call_later(timeout, task.cancel)
        correlation_id = str(uuid.uuid4())
        reply = self.loop.create_future()
        self.pending[correlation_id] = reply
        try:
            sent_ms = time.time_ns() // 1_000_000
            properties = commands.Basic.Properties(
                content_type="application/json",
                correlation_id=correlation_id,
                reply_to=self.exchange,
                expiration=str(max(1, int(timeout * 1000))),
                delivery_mode=1,
                timestamp=datetime.datetime.fromtimestamp(sent_ms // 1000, tz=datetime.timezone.utc),
                headers={
                    "timestamp_in_ms": sent_ms,
                    "traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01",
                    "x-callme-reply-queue": self.queue,
                },
            )
            confirmed = self.loop.create_future()
            self.confirms.append(confirmed)
            self.wire.send(
                1,
                commands.Basic.Publish(exchange=self.target, routing_key="", mandatory=True),
                header.ContentHeader(0, len(body), properties),
                ContentBody(body),
            )
            await confirmed
            data = await reply
        finally:
            deadline.cancel()
            del self.pending[correlation_id]
        return json.loads(data)["result"]


def call(server_id):
    loop = asyncio.new_event_loop()
    client = Client(loop, os.environ["CALLME_AMQP_URL"], server_id)
    loop.run_until_complete(client.connect())

    def add(a, b):
        return loop.run_until_complete(client.call("add", [a, b]))

    answer_rounds(add)


if __name__ == "__main__":
    {"call": call}[sys.argv[1]](sys.argv[2])
