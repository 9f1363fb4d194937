"""A lean blocking client of docs/protocol.md on pika, driven by bench/sequential.py.

Not a client to use: no timeouts, reconnection, errors or threads. It
does only what one sequential call needs (a publisher-confirmed,
mandatory request and the wait for its reply, on one connection) to show
how fast a blocking Python caller on a plain AMQP library can go against
the same host. Runs under the interpreter of a venv holding pika (see
requirements-pika.txt):

    python lean_pika.py call SERVER_ID

The broker is ``CALLME_AMQP_URL``. The worker answers rounds as
worker_rounds.py says.
"""

import json
import os
import sys
import uuid

import pika
from worker_rounds import answer_rounds


def call(server_id):
    conn = pika.BlockingConnection(pika.URLParameters(os.environ["CALLME_AMQP_URL"]))
    channel = conn.channel()
    exchange = "client_bench_ex_" + uuid.uuid4().hex
    channel.exchange_declare(exchange, "fanout", auto_delete=True)
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, exchange)
    channel.confirm_delivery()
    replies = {}

    def on_reply(_channel, _method, properties, body):
        replies[properties.correlation_id] = body

    channel.basic_consume(queue, on_reply, auto_ack=True)

    def add(a, b):
        correlation_id = str(uuid.uuid4())
        properties = pika.BasicProperties(
            content_type="application/json",
            correlation_id=correlation_id,
            reply_to=exchange,
            expiration="30000",
            delivery_mode=1,
        )
        request = json.dumps({"func": "add", "args": [a, b]}).encode()
        channel.basic_publish("server_%s_ex" % server_id, "", request, properties, mandatory=True)
        while correlation_id not in replies:
            conn.process_data_events(time_limit=None)
        return json.loads(replies.pop(correlation_id))["result"]

    answer_rounds(add)


if __name__ == "__main__":
    {"call": call}[sys.argv[1]](sys.argv[2])
