"""The original callme 0.2.0, driven by bench/sequential.py.

Runs under the interpreter of a venv holding ``callme==0.2.0`` (see
requirements-callme-0.2.txt), never under callme_client's:

    python seed_callme.py serve SERVER_ID   # callme.Server with add(a, b)
    python seed_callme.py call SERVER_ID    # a worker timing proxy.add

The broker is ``CALLME_AMQP_URL``. The server prints ``ready`` once it
consumes. The worker answers rounds as worker_rounds.py says.
"""

import os
import sys
import threading
from urllib.parse import unquote, urlsplit

import callme
from worker_rounds import answer_rounds


def broker():
    url = urlsplit(os.environ.get("CALLME_AMQP_URL", "amqp://guest:guest@localhost/%2f"))
    return dict(
        amqp_host=url.hostname or "localhost",
        amqp_port=url.port or 5672,
        amqp_user=unquote(url.username or "guest"),
        amqp_password=unquote(url.password or "guest"),
        amqp_vhost=unquote(url.path[1:]) or "/",
    )


def add(a, b):
    return a + b


def serve(server_id):
    server = callme.Server(server_id=server_id, **broker())
    server.register_function(add, "add")
    threading.Thread(target=lambda: (server.wait(), print("ready", flush=True)), daemon=True).start()
    server.start()


def call(server_id):
    proxy = callme.Proxy(server_id, **broker())
    fooserver = proxy.use_server(server_id, timeout=30)
    answer_rounds(fooserver.add)


if __name__ == "__main__":
    {"serve": serve, "call": call}[sys.argv[1]](sys.argv[2])
