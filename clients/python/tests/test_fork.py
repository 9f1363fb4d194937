"""A blocking proxy across ``os.fork()``: the child gets a connection of
its own, and the parent's connection never hears of the child, whether the child calls
(first from several threads at once), closes the proxy or drops it.

A forked child shares its parent's socket and its event loop's epoll
instance; whatever the child did on them (a request, a reply read, the
close at its exit, its loop's clean-up) would reach the parent's
connection. The script runs in a process of its own so its children can
exit the normal way, at-exit handlers and all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import Host

CHILD_SCRIPT = textwrap.dedent(
    """
    import gc, os, sys, threading
    from concurrent.futures import ThreadPoolExecutor
    import callme_client as callme

    url, calc = sys.argv[1], sys.argv[2]
    proxy = callme.Proxy(url, timeout=20)
    server = proxy.use_server(calc)
    assert server.add(1, 2) == 3
    parent_exchange = proxy.reply_exchange

    children = []
    for n in range(4):
        pid = os.fork()
        if pid == 0:
            ok = True
            if n == 0:
                # The child's first call, from 4 threads at once: one
                # connection is made for them.
                start = threading.Barrier(4)

                def first(i):
                    start.wait()
                    return server.add(i, 100)

                with ThreadPoolExecutor(4) as pool:
                    ok = list(pool.map(first, range(4))) == [100, 101, 102, 103]
            if n in (0, 1):
                ok = ok and server.add(n, 100) == n + 100
                with ThreadPoolExecutor(4) as pool:
                    ok = ok and list(pool.map(lambda i: server.add(i, n), range(40))) == [
                        i + n for i in range(40)
                    ]
                ok = ok and proxy.reply_exchange != parent_exchange
            if n in (1, 2):
                # Closed: the child's own connection (1), or nothing of its
                # own yet (2).
                proxy.close()
            if n == 3:
                # Dropped without a call.
                del server, proxy
            gc.collect()
            # The normal exit: at-exit handlers and finalizers run.
            sys.exit(0 if ok else 3)
        children.append(pid)

    # The parent calls while its children call and exit.
    for i in range(200):
        assert server.add(i, 1) == i + 1, i
    statuses = [os.waitpid(pid, 0)[1] for pid in children]
    assert all(os.WIFEXITED(s) and os.WEXITSTATUS(s) == 0 for s in statuses), statuses

    # The parent's loop still hears its wake-up (another thread handing it
    # a call while it waits for I/O): a child's loop closed at its exit
    # takes what it watched out of the epoll instance it shares with the
    # parent. The kernel's own list of what that instance watches.
    loop = proxy._loop.loop
    with open(f"/proc/self/fdinfo/{loop._selector.fileno()}") as info:
        watched = {int(l.split()[1]) for l in info if l.startswith("tfd:")}
    assert loop._ssock.fileno() in watched, ("wake-up not watched", watched)

    # The parent's connection is whole: calls alone, and calls from many
    # threads at once (handed to the proxy's own thread, which the child's
    # clean-up could have cut off from its loop).
    gc.collect()
    assert proxy.reply_exchange == parent_exchange
    for i in range(50):
        assert server.add(i, 2) == i + 2
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(lambda i: server.add(i, 3), range(400))) == [
            i + 3 for i in range(400)
        ]
    proxy.close()
    print("fork-ok")
    """
)


def test_a_forked_child_calls_on_its_own_connection_and_the_parent_keeps_its_own(
    amqp_url: str, host: Host, tmp_path: Path
) -> None:
    script = tmp_path / "fork_children.py"
    script.write_text(CHILD_SCRIPT)
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(
        [sys.executable, str(script), amqp_url, host.calc],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "fork-ok" in done.stdout, (
        f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr[-4000:]}"
    )
    # The parent's connection was never lost (the proxy would have made
    # another, and said so on the callme.proxy logger).
    assert "lost the connection" not in done.stderr, done.stderr[-4000:]
    assert "reconnect" not in done.stderr, done.stderr[-4000:]
