"""Sequential ``add`` calls: callme_client beside the original callme 0.2.0
(and, with ``--rust``, the Rust proxy), in one run against one broker.

Rows, measured in interleaved rounds (every row runs once per round, in
turn, so a machine that slows down during the run slows them alike):

- ``callme_client Proxy``: this repository's blocking proxy calling
  ``add`` of the calc plugin on a ``callme serve`` host;
- ``callme_client AsyncProxy``: the same calls awaited on one event loop;
- ``callme 0.2.0``: the original library's proxy calling ``add`` of its
  own ``callme.Server`` (a process of its own, as the host is), run by
  bench/seed_callme.py under another venv;
- ``lean pika client`` (with ``--pika-python``): bench/lean_pika.py, the
  least a blocking caller on a plain AMQP library does per call (no
  timeouts, errors or threads), calling the same host: a reference for
  what a blocking Python client could reach;
- ``lean pamqp client``: bench/lean_pamqp.py, the same calls as the lean
  pika client with pamqp's framing on a plain socket (the least an AMQP
  layer can do), under this interpreter, which holds pamqp through
  aio-pika: a reference for what a blocking Python caller could reach
  with no AMQP library between it and the socket;
- ``lean asyncio client``: bench/lean_asyncio.py, the calls of the
  blocking ``Proxy`` (the loop run in the caller's thread, a timer, the
  client's properties and headers, acks in runs) with pamqp's framing
  read in an ``asyncio.Protocol``, no aiormq: a reference for what a
  client built on asyncio could reach with a leaner AMQP layer;
- ``Proxy shared by 8 threads``: calls/s of 8 threads calling through one
  blocking proxy at once (8 × the round's calls), printed apart: its
  calls are not sequential.

With ``--rust``, ``cargo bench -p callme --bench rpc`` runs afterwards and
its ``callme calc.add`` row (the Rust proxy calling the calc plugin
through the broker; that benchmark serves it in its own process) is
printed beside them. Ratios are medians of per-round ratios. Run it with
scripts/bench-python, which sets up the venvs, the broker and the builds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import callme_client

Samples = List[float]

#: Threads sharing one blocking proxy in the shared-proxy row.
THREADS = 8


class Round:
    """One row's round: each call's duration, and the CPU time its caller's
    process spent meanwhile (seconds)."""

    def __init__(self, samples: Samples, cpu: float) -> None:
        self.samples = samples
        self.cpu = cpu


def percentile(samples: Samples, q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def rate(samples: Samples) -> float:
    return len(samples) / sum(samples)


def wait_for(what: str, check: Callable[[], bool], proc: "subprocess.Popen[Any]", log: Path) -> None:
    deadline = time.monotonic() + 120
    while not check():
        if proc.poll() is not None or time.monotonic() > deadline:
            sys.stderr.write(log.read_text(errors="replace")[-4000:])
            raise SystemExit(f"bench: {what} did not start (log above)")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callme", required=True, help="the callme binary (release build)")
    parser.add_argument("--plugin", required=True, help="calc.wasm")
    parser.add_argument("--seed-python", required=True, help="python of the callme 0.2.0 venv")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=400, help="sequential calls per round")
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--rust", action="store_true", help="also run cargo bench --bench rpc")
    parser.add_argument("--pika-python", help="python of a venv holding pika: adds the lean pika row")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the blocking proxy's calls into FILE")
    opts = parser.parse_args()

    url = os.environ.get("CALLME_AMQP_URL")
    if not url:
        raise SystemExit('bench: CALLME_AMQP_URL is not set: eval "$(scripts/broker env)"')
    tag = uuid.uuid4().hex[:8]
    work = Path(tempfile.mkdtemp(prefix="callme-bench-py-"))
    procs: "List[subprocess.Popen[Any]]" = []
    try:
        # The host: calc under an id of this run only.
        plugins = work / "plugins"
        plugins.mkdir()
        server_id = f"bench-py-calc-{tag}"
        shutil.copy(opts.plugin, plugins / f"{server_id}.wasm")
        ready = work / "ready"
        host_log = work / "host.log"
        host = subprocess.Popen(
            [opts.callme, "serve", "--plugins", str(plugins), "--ready-file", str(ready),
             "--cache-dir", str(work / "cache")],
            stdout=subprocess.DEVNULL, stderr=open(host_log, "wb"),
        )
        procs.append(host)
        wait_for("callme serve", ready.exists, host, host_log)

        # The original library's server and proxy.
        seed_id = f"bench-py-seed-{tag}"
        seed_script = str(Path(__file__).with_name("seed_callme.py"))
        seed_log = work / "seed.log"
        seed_server = subprocess.Popen(
            [opts.seed_python, seed_script, "serve", seed_id],
            stdout=subprocess.PIPE, stderr=open(seed_log, "wb"), text=True,
        )
        procs.append(seed_server)
        assert seed_server.stdout is not None
        if seed_server.stdout.readline().strip() != "ready":
            wait_for("the callme 0.2.0 server", lambda: False, seed_server, seed_log)
        seed_client = subprocess.Popen(
            [opts.seed_python, seed_script, "call", seed_id],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(work / "seed-client.log", "wb"),
            text=True,
        )
        procs.append(seed_client)

        def worker_round(worker: "subprocess.Popen[Any]", what: str, log: Path) -> Callable[[int], Round]:
            def run(n: int) -> Round:
                assert worker.stdin is not None and worker.stdout is not None
                worker.stdin.write(f"{n}\n")
                worker.stdin.flush()
                line = worker.stdout.readline()
                if not line:
                    sys.stderr.write(log.read_text(errors="replace")[-4000:])
                    raise SystemExit(f"bench: {what} failed (log above)")
                done = json.loads(line)
                return Round(done["samples"], done["cpu"])

            return run

        seed_round = worker_round(seed_client, "the callme 0.2.0 proxy", work / "seed-client.log")

        proxy = callme_client.Proxy(url, timeout=30, connection_name=f"bench-py-{tag}")
        calc = proxy.use_server(server_id)
        clock = time.perf_counter

        def blocking_round(n: int) -> Round:
            samples = []
            cpu = time.process_time()
            for i in range(n):
                t = clock()
                result = calc.add(i, 1)
                samples.append(clock() - t)
                assert result == i + 1, result
            return Round(samples, time.process_time() - cpu)

        loop = asyncio.new_event_loop()
        aproxy = callme_client.AsyncProxy(url, timeout=30)
        loop.run_until_complete(aproxy.connect())
        acalc = aproxy.use_server(server_id)

        async def async_calls(n: int) -> Samples:
            samples = []
            for i in range(n):
                t = clock()
                result = await acalc.add(i, 1)
                samples.append(clock() - t)
                assert result == i + 1, result
            return samples

        def async_round(n: int) -> Round:
            cpu = time.process_time()
            samples = loop.run_until_complete(async_calls(n))
            return Round(samples, time.process_time() - cpu)

        rows: Dict[str, Callable[[int], Round]] = {
            "callme_client Proxy": blocking_round,
            "callme_client AsyncProxy": async_round,
            "callme 0.2.0 (kombu)": seed_round,
        }
        def lean_client(python: str, script: str, name: str) -> None:
            """Adds the row of a lean client, run by ``python``."""
            log = work / f"{script}.log"
            client = subprocess.Popen(
                [python, str(Path(__file__).with_name(script)), "call", server_id],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "wb"),
                text=True,
            )
            procs.append(client)
            rows[name] = worker_round(client, f"the {name}", log)

        if opts.pika_python:
            lean_client(opts.pika_python, "lean_pika.py", "lean pika client")
        lean_client(sys.executable, "lean_pamqp.py", "lean pamqp client")
        lean_client(sys.executable, "lean_asyncio.py", "lean asyncio client")

        def shared_round(n: int) -> float:
            """Calls/s of THREADS threads sharing the blocking proxy, n
            calls in all."""
            each = max(1, n // THREADS)

            def caller(thread: int) -> None:
                for i in range(each):
                    assert calc.add(thread, i) == thread + i

            started = clock()
            with ThreadPoolExecutor(THREADS) as pool:
                list(pool.map(caller, range(THREADS)))
            return each * THREADS / (clock() - started)

        for run in rows.values():
            run(opts.warmup)
        shared_round(opts.warmup)
        rounds: Dict[str, List[Round]] = {name: [] for name in rows}
        shared: List[float] = []
        for _ in range(opts.rounds):
            for name, run in rows.items():
                rounds[name].append(run(opts.calls))
            shared.append(shared_round(opts.calls * THREADS))

        if opts.profile:
            import cProfile

            cProfile.runctx("blocking_round(opts.calls)", globals(), locals(), opts.profile)

        print(f"{opts.rounds} interleaved rounds of {opts.calls} sequential add calls "
              f"(after {opts.warmup} warm-up calls); python {platform.python_version()}, "
              f"{os.cpu_count()} cores")
        figures: Dict[str, "tuple[float, float]"] = {}
        for name, per_round in rounds.items():
            every = [s for r in per_round for s in r.samples]
            cpu = sum(r.cpu for r in per_round) / len(every)
            figures[name] = (rate(every), percentile(every, 0.5))
            print(f"{name:<26} {rate(every):>7.0f} calls/s  p50 {percentile(every, 0.5) * 1e6:>7.0f} µs"
                  f"  p99 {percentile(every, 0.99) * 1e6:>7.0f} µs"
                  f"  caller CPU {cpu * 1e6:>5.0f} µs/call")

        def ratio(label: str, of: str, to: str) -> None:
            pairs = list(zip(rounds[of], rounds[to]))
            r = statistics.median(rate(a.samples) / rate(b.samples) for a, b in pairs)
            p = statistics.median(
                percentile(a.samples, 0.5) / percentile(b.samples, 0.5) for a, b in pairs
            )
            print(f"{label}: calls/s {r:.2f}x, p50 {p:.2f}x")

        print(f"callme_client Proxy shared by {THREADS} threads: "
              f"{statistics.median(shared):.0f} calls/s (median of the rounds)")

        print()
        ratio("callme_client Proxy / callme 0.2.0 (target: calls/s >= 3x)",
              "callme_client Proxy", "callme 0.2.0 (kombu)")
        ratio("callme_client AsyncProxy / callme 0.2.0",
              "callme_client AsyncProxy", "callme 0.2.0 (kombu)")
        ratio("callme_client Proxy / AsyncProxy", "callme_client Proxy", "callme_client AsyncProxy")
        if "lean pika client" in rounds:
            ratio("lean pika client / callme 0.2.0", "lean pika client", "callme 0.2.0 (kombu)")
            ratio("callme_client Proxy / lean pika client",
                  "callme_client Proxy", "lean pika client")

        ratio("lean pamqp client / callme 0.2.0", "lean pamqp client", "callme 0.2.0 (kombu)")
        ratio("lean asyncio client / callme 0.2.0", "lean asyncio client", "callme 0.2.0 (kombu)")
        ratio("callme_client Proxy / lean asyncio client",
              "callme_client Proxy", "lean asyncio client")

        proxy.close()
        loop.run_until_complete(aproxy.close())
        loop.close()
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(work, ignore_errors=True)

    if opts.rust:
        rust_row(figures["callme_client Proxy"], figures["callme_client AsyncProxy"])


def rust_row(blocking: "tuple[float, float]", asynchronous: "tuple[float, float]") -> None:
    """Runs the rpc benchmark and sets its ``callme calc.add`` sequential
    figures beside ours."""
    print("\nRust proxy: cargo bench -p callme --bench rpc (its own rounds, run after the rows above)")
    done = subprocess.run(
        ["cargo", "bench", "-q", "-p", "callme", "--bench", "rpc"],
        stdout=subprocess.PIPE, text=True,
    )
    found: Optional[re.Match[str]] = None
    for line in done.stdout.splitlines():
        if line.startswith("callme calc.add"):
            found = re.search(r"p50\s+([\d.]+)\s*µs.*?(\d+)\s+calls/s", line)
            print(line)
    if done.returncode != 0 or found is None:
        print("(the rpc benchmark failed or printed no `callme calc.add` row: Rust proxy skipped)")
        return
    p50, calls = float(found.group(1)) * 1e-6, float(found.group(2))
    print(f"Rust proxy (in-process calc server) {calls:>7.0f} calls/s  p50 {p50 * 1e6:>7.0f} µs")
    for name, (r, p) in (("Proxy", blocking), ("AsyncProxy", asynchronous)):
        print(f"callme_client {name} / Rust proxy: calls/s {r / calls:.2f}x, p50 {p / p50:.2f}x")


if __name__ == "__main__":
    main()
