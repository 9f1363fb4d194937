"""A lean blocking client of docs/protocol.md on pika, driven by bench/sequential.py.

Not a client to use: no timeouts, reconnection, errors or threads. It
does only what one sequential call needs (a publisher-confirmed,
mandatory request and the wait for its reply, on one connection) to show
how fast a blocking Python caller on a plain AMQP library can go against
the same host. Runs under the interpreter of a venv holding pika (see
requirements-pika.txt):

    python lean_pika.py call SERVER_ID

The broker is ``CALLME_AMQP_URL``. The worker reads ``N`` lines on stdin,
makes N sequential ``add`` calls and answers each line with one JSON
object: the calls' durations (seconds) and the CPU time it spent on them.
"""

import json
import os
import sys
import time
import uuid

import pika


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

    clock = time.perf_counter
    for line in sys.stdin:
        samples = []
        cpu = time.process_time()
        for i in range(int(line)):
            t = clock()
            result = add(i, 1)
            samples.append(clock() - t)
            if result != i + 1:
                raise SystemExit("wrong answer %r" % (result,))
        cpu = time.process_time() - cpu
        print(json.dumps({"samples": samples, "cpu": cpu}), flush=True)


if __name__ == "__main__":
    {"call": call}[sys.argv[1]](sys.argv[2])
