"""The asyncio proxy: many calls in flight on one connection."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
from typing import Any, List

import aiormq.connection
import pytest

import callme_client as callme
import callme_client.async_proxy as callme_async_proxy
import callme_client.link as callme_link
import callme_client.publisher as callme_publisher
from conftest import Forwarder, Host, rabbitmqctl, unique


def test_a_thousand_calls_in_flight(amqp_url: str, host: Host) -> None:
    async def main() -> None:
        async with callme.AsyncProxy(amqp_url, timeout=60) as proxy:
            calc = proxy.use_server(host.calc)
            results = await asyncio.gather(*(calc.add(i, i) for i in range(1000)))
            assert results == [2 * i for i in range(1000)]

    asyncio.run(main())


def test_the_seed_example_awaited_connects_on_first_use(amqp_url: str, host: Host) -> None:
    async def main() -> None:
        proxy = callme.AsyncProxy(amqp_url)
        try:
            assert proxy.reply_exchange is None
            assert await proxy.use_server(host.calc).add(1, 1) == 2
            assert await proxy.use_server(host.calc).add(a=1, b=2) == 3
            assert await proxy.use_server(host.calc).call("stats.mean", [1, 2, 6]) == 3.0
            assert proxy.reply_exchange is not None
        finally:
            await proxy.close()

    asyncio.run(main())


def missing_beside_served(amqp_url: str, host: Host, calls: int) -> None:
    """``calls`` calls at once on one proxy, every other one to a server id
    nobody serves: each of those fails alone, with ``NoSuchServer``."""

    async def main() -> None:
        async with callme.AsyncProxy(amqp_url, timeout=30) as proxy:

            async def one(i: int) -> str:
                server = host.missing if i % 2 else host.calc
                try:
                    return "ok" if await proxy.use_server(server).add(i, 1) == i + 1 else "wrong"
                except callme.NoSuchServer:
                    return "missing"

            results = await asyncio.gather(*(one(i) for i in range(calls)))
            assert results.count("ok") == calls // 2 and results.count("missing") == calls // 2

    asyncio.run(main())


def test_missing_servers_beside_served_ones(amqp_url: str, host: Host) -> None:
    missing_beside_served(amqp_url, host, 400)


def test_missing_servers_beside_served_ones_with_aiormqs_write_queue_full(
    amqp_url: str, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiormq answers a channel the broker closed (a request to a missing
    server) with a ``CloseOk`` it drops when its write queue is full; the
    broker then closes the whole connection when aiormq reuses the
    channel's number. The proxy makes that queue unbounded. Here aiormq's
    bound is 1 frame, so without that the queue is full all the time, and
    the proxy has 2 lanes, so a lane the broker closed is most often the
    highest-numbered channel, whose number aiormq gives the next one."""
    monkeypatch.setattr(aiormq.connection.Connection, "FRAME_BUFFER_SIZE", 1)
    monkeypatch.setattr(
        callme_async_proxy, "Publisher", functools.partial(callme_publisher.Publisher, lanes=2)
    )
    missing_beside_served(amqp_url, host, 1000)


def test_async_errors_and_timeouts(amqp_url: str, host: Host) -> None:
    async def main() -> None:
        async with callme.AsyncProxy(amqp_url, timeout=30) as proxy:
            with pytest.raises(callme.GuestError):
                await proxy.use_server(host.calc).divide(1, 0)
            started = time.monotonic()
            with pytest.raises(callme.Timeout):
                await proxy.use_server(host.calc, timeout=0.3).call("slow-version", 1000)
            # Calls made while one times out are not disturbed.
            slow = asyncio.ensure_future(proxy.use_server(host.calc).call("slow-version", 300))
            assert await proxy.use_server(host.calc).add(1, 2) == 3
            assert await slow == "1"
            # Nor by its reply, landing at about 1 s among calls in flight.
            calc = proxy.use_server(host.calc)
            i = 0
            while time.monotonic() < started + 1.5:
                got = await asyncio.gather(*(calc.add(i, k) for k in range(4)))
                assert got == [i + k for k in range(4)]
                i += 1

    asyncio.run(main())


def test_a_closed_async_proxy_refuses_calls(amqp_url: str, host: Host) -> None:
    async def main() -> None:
        proxy = callme.AsyncProxy(amqp_url)
        await proxy.connect()
        await proxy.close()
        with pytest.raises(callme.ConnectionError):
            await proxy.use_server(host.calc).add(1, 1)

    asyncio.run(main())


def test_requests_carry_their_send_time_and_a_trace(amqp_url: str) -> None:
    """What a host reads from a request besides its body (docs/protocol.md):
    the send time, for its queue-wait metric, a W3C traceparent, and the
    reply queue, where a busy host pipelines replies."""
    import time

    import aio_pika

    from callme_client.protocol import server_exchange

    server_id = unique("headers")
    proxy_queue: "list[str]" = []

    async def main() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            exchange = await channel.declare_exchange(
                server_exchange(server_id), aio_pika.ExchangeType.DIRECT, auto_delete=True
            )
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(exchange, "")

            async def answer(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                async with message.process():
                    headers = message.headers or {}
                    seen = {
                        "timestamp": message.timestamp.timestamp() if message.timestamp else None,
                        "timestamp_in_ms": headers.get("timestamp_in_ms"),
                        "traceparent": headers.get("traceparent"),
                        "queue": headers.get("x-callme-reply-queue"),
                    }
                    reply = aio_pika.Message(
                        json.dumps({"result": seen}).encode(),
                        correlation_id=message.correlation_id,
                    )
                    reply_to = await channel.get_exchange(message.reply_to or "", ensure=False)
                    await reply_to.publish(reply, routing_key="")

            await queue.consume(answer)
            before = time.time()
            async with callme.AsyncProxy(amqp_url, timeout=30) as proxy:
                seen = await proxy.use_server(server_id).call("anything")
                assert proxy._link is not None
                proxy_queue.append(proxy._link.queue)
            after = time.time()
        assert before - 1 <= seen["timestamp_in_ms"] / 1000 <= after + 1, seen
        assert int(before) - 1 <= seen["timestamp"] <= after + 1, seen
        version, trace_id, span_id, flags = seen["traceparent"].split("-")
        # A new trace per call, not sampled (nothing recorded its span), as
        # the Rust proxy's.
        assert (version, len(trace_id), len(span_id), flags) == ("00", 32, 16, "00"), seen
        assert int(trace_id, 16) != 0 and int(span_id, 16) != 0, seen
        assert seen["queue"] == proxy_queue[0], seen

    asyncio.run(main())



def test_replies_come_pipelined_under_load(amqp_url: str, host: Host) -> None:
    """Under load the host pipelines replies to the reply queue the client
    names (docs/protocol.md, "Pipelined replies"): the answers are the
    same, and the host counts them."""
    import re
    import urllib.request

    def pipelined() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{host.metrics_port}/metrics").read()
        pattern = r'callme_replies_pipelined_total\{server_id="%s"\} (\S+)' % re.escape(host.calc)
        found = re.search(pattern, text.decode())
        return float(found.group(1)) if found else 0.0

    async def main() -> None:
        async with callme.AsyncProxy(amqp_url, timeout=60) as proxy:
            calc = proxy.use_server(host.calc)
            before = pipelined()
            results = await asyncio.gather(*(calc.add(i, 1) for i in range(500)))
            assert results == [i + 1 for i in range(500)]
            assert pipelined() - before >= 100, (before, pipelined())

    asyncio.run(main())


def test_a_flood_of_replies_waits_in_the_broker_not_in_the_caller(amqp_url: str, host: Host) -> None:
    """Whoever may publish to a proxy's reply queue cannot make it hold a
    flood of replies: the proxy takes at most 64 unacknowledged, the rest
    waits in the broker, its own calls are answered all the while, and
    once the flood is over every reply taken is acknowledged."""
    import aio_pika
    from conftest import rabbitmqctl

    async def main() -> None:
        async with callme.AsyncProxy(amqp_url, timeout=30) as proxy:
            calc = proxy.use_server(host.calc)
            assert await calc.add(1, 1) == 2
            assert proxy._link is not None
            queue = proxy._link.queue
            consumers = rabbitmqctl(
                "list_consumers", "-q", "--no-table-headers",
                "queue_name", "ack_required", "prefetch_count",
            )
            mine = [line.split() for line in consumers.splitlines() if line.split()[:1] == [queue]]
            assert mine and mine[0][1:] == ["true", "64"], consumers

            flooder = await aio_pika.connect(amqp_url)
            async with flooder:
                channel = await flooder.channel(publisher_confirms=False)
                body = b" " * (64 << 10)

                async def flood() -> None:
                    for i in range(4000):
                        await channel.default_exchange.publish(
                            aio_pika.Message(body, correlation_id=f"flood-{i}"), routing_key=queue
                        )

                async def calls() -> None:
                    for i in range(200):
                        assert await calc.add(i, 1) == i + 1

                await asyncio.gather(flood(), calls())

            deadline = asyncio.get_running_loop().time() + 30
            while True:
                listed = rabbitmqctl(
                    "list_queues", "-q", "--no-table-headers",
                    "name", "messages_ready", "messages_unacknowledged",
                )
                if [queue, "0", "0"] in [line.split() for line in listed.splitlines()]:
                    break
                assert asyncio.get_running_loop().time() < deadline, listed
                await asyncio.sleep(0.2)
            assert await calc.add(7, 1) == 8

    asyncio.run(main())


def test_a_cancelled_error_no_one_asked_for_is_told_from_a_cancellation() -> None:
    # aiormq fails what waits on a connection it gave up with a
    # CancelledError of its own; the proxy must not take it for its
    # caller's cancellation (or its deadline's).
    from callme_client.publisher import cancelled_by_caller

    async def main() -> None:
        seen: "list[bool]" = []
        handed: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()
        handed.set_exception(asyncio.CancelledError())

        async def waits_on_handed() -> None:
            try:
                await handed
            except asyncio.CancelledError:
                seen.append(cancelled_by_caller())

        async def is_cancelled() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                seen.append(cancelled_by_caller())

        await asyncio.ensure_future(waits_on_handed())
        task = asyncio.ensure_future(is_cancelled())
        await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if sys.version_info >= (3, 11):
            assert seen == [False, True]
        else:
            assert seen == [True, True]

    asyncio.run(main())


def test_a_request_expires_when_its_call_does(
    amqp_url: str, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request's ``expiration`` is the time its call has left when it is
    sent, not its whole timeout: a call that waited 1.5 s for its
    connection, of 4 s, lets the broker keep its request 2.5 s at most, so
    it never runs long after its caller gave up."""
    sent: "list[int]" = []
    publish = callme_publisher.Publisher.publish

    async def noting(self: Any, connection: Any, server_id: str, exchange: str, body: bytes,
                     properties: Any, deadline: Any = None) -> None:
        await publish(self, connection, server_id, exchange, body, properties, deadline)
        sent.append(int(properties.expiration))

    connection = callme_link.Link.connection

    async def slow(self: Any) -> Any:
        await asyncio.sleep(1.5)
        return await connection(self)

    monkeypatch.setattr(callme_publisher.Publisher, "publish", noting)
    monkeypatch.setattr(callme_link.Link, "connection", slow)

    async def main() -> None:
        async with callme.AsyncProxy(amqp_url, timeout=4) as proxy:
            assert await proxy.use_server(host.calc).add(1, 1) == 2

    asyncio.run(main())
    assert len(sent) == 1 and 1000 < sent[0] <= 2500, sent


@pytest.mark.skipif(sys.version_info < (3, 11), reason="cancellations are counted from Python 3.11")
def test_a_cancellation_that_comes_with_the_deadline_is_kept(amqp_url: str, host: Host) -> None:
    """A task cancelled by its owner in the same instant as its call's
    deadline passes is cancelled, not handed a ``Timeout`` its owner could
    catch and carry on from: the loop is held past both, so both land
    before the call wakes."""

    async def main() -> None:
        async with callme.AsyncProxy(amqp_url) as proxy:
            await proxy.connect()
            loop = asyncio.get_running_loop()
            task = asyncio.ensure_future(
                proxy.use_server(host.calc, timeout=0.5).call("slow-version", 3000)
            )
            await asyncio.sleep(0)
            loop.call_later(0.4, time.sleep, 0.3)  # holds the loop past the deadline
            loop.call_later(0.45, task.cancel)
            with pytest.raises(asyncio.CancelledError):
                await task
            # The proxy serves on.
            assert await proxy.use_server(host.calc).add(2, 2) == 4

    asyncio.run(main())


def test_a_first_connection_that_failed_unforeseen_is_tried_again(
    amqp_url: str, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However the first connection attempt failed, the next call tries
    again rather than getting that failure for ever; an attempt aiormq
    gave up (with a CancelledError of its own) is a ConnectionError to the
    caller, who cancelled nothing."""
    start = callme_link.Link.start
    failures: "list[BaseException]" = [asyncio.CancelledError(), RuntimeError("unforeseen")]

    async def failing_once(self: Any) -> None:
        if failures:
            raise failures.pop()
        await start(self)

    monkeypatch.setattr(callme_link.Link, "start", failing_once)

    async def main() -> None:
        proxy = callme.AsyncProxy(amqp_url)
        try:
            with pytest.raises(RuntimeError, match="unforeseen"):
                await proxy.use_server(host.calc).add(1, 1)
            with pytest.raises(callme.ConnectionError, match="given up"):
                await proxy.use_server(host.calc).add(1, 1)
            assert await proxy.use_server(host.calc).add(1, 2) == 3
        finally:
            await proxy.close()

    asyncio.run(main())


@pytest.mark.skipif(sys.version_info < (3, 11), reason="cancellations are counted from Python 3.11")
def test_a_call_made_in_a_clean_up_after_a_cancellation_still_times_out(
    amqp_url: str, host: Host
) -> None:
    """A task that caught a cancellation and calls while it cleans up has
    a cancellation counted already: its call's deadline is still a
    ``Timeout``, not taken for someone else's cancellation."""

    async def main() -> None:
        async with callme.AsyncProxy(amqp_url) as proxy:
            await proxy.connect()

            async def cleaning_up() -> str:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    with pytest.raises(callme.Timeout):
                        await proxy.use_server(host.calc, timeout=0.3).call("slow-version", 2000)
                    return "cleaned up"
                return "not cancelled"

            task = asyncio.ensure_future(cleaning_up())
            await asyncio.sleep(0.05)
            task.cancel()
            assert await task == "cleaned up"

    asyncio.run(main())


def _on_queue_process(queue: str, function: str) -> None:
    """Calls ``function`` (``sys:suspend``, ``sys:resume``) on the process of
    the classic queue ``queue`` inside the broker."""
    rabbitmqctl(
        "eval",
        f'{{ok, Q}} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, <<"{queue}">>)), '
        f"{function}(amqqueue:get_pid(Q)).",
    )


def test_a_server_that_stops_confirming_holds_a_quarter_of_the_lanes(
    amqp_url: str, host: Host
) -> None:
    """A server whose queue stops confirming requests (here its queue's
    process suspended inside the broker, as a quorum queue without a
    majority withholds confirms) holds at most a quarter of a proxy's
    lanes: with 80 calls to it waiting for their confirms, a call to
    another server is answered."""
    queue = f"server_{host.hostile}_queue"

    async def main() -> None:
        async with callme.AsyncProxy(amqp_url, timeout=30) as proxy:
            stuck = proxy.use_server(host.hostile)
            assert await stuck.counter() == 1
            await asyncio.to_thread(_on_queue_process, queue, "sys:suspend")
            try:
                waiting = [asyncio.ensure_future(stuck.counter()) for _ in range(80)]
                await asyncio.sleep(0.5)
                beside = await asyncio.wait_for(proxy.use_server(host.calc).add(2, 3), 5)
                done = sum(w.done() for w in waiting)
                assert done == 0, f"{done} calls to the queue that confirms nothing ended"
            finally:
                await asyncio.to_thread(_on_queue_process, queue, "sys:resume")
            assert beside == 5
            assert await asyncio.gather(*waiting) == [1] * 80

    asyncio.run(main())


def test_a_request_on_a_connection_that_ended_without_an_error_fails_typed() -> None:
    """aiormq fails what waits on a connection whose reader found the
    socket's end between two frames (so the connection ended as if asked
    to) with a bare ``Exception``: a request then fails ``ConnectionError``,
    as with any other loss, never with an untyped error. Played by a lane
    that fails its publish so, as aiormq's does then."""

    class Transport:
        class connection:  # aiormq's, its reader and writer running
            is_opened = True

    class Connection:
        is_closed = False
        transport = Transport()

    class Ended:
        is_closed = False

        async def basic_publish(self, *args: Any, **kwargs: Any) -> None:
            raise Exception

    async def main() -> None:
        publisher = callme_publisher.Publisher(lanes=4)
        connection: Any = Connection()
        publisher._idle.append((connection, Ended()))
        with pytest.raises(callme.ConnectionError, match="could not be sent") as failed:
            await publisher.publish(
                connection, "calc", "server_calc_ex", b"{}", aiormq.spec.Basic.Properties()
            )
        # Written, as far as the proxy can tell: not to be sent again.
        assert not isinstance(failed.value, callme_publisher.NotSent)

    asyncio.run(main())


@pytest.mark.parametrize("lane", ["idle", "new", "new, cancelled"])
def test_a_request_whose_connection_is_lost_is_not_written_and_says_so(lane: str) -> None:
    """A connection whose aiormq reader has ended (aio-pika not told yet):
    the request is not written to a lane, idle or new, and the error says
    it was not sent (:class:`NotSent`), so the call can send it again on
    the next connection. Also when opening the lane fails with the
    ``CancelledError`` aiormq fails everything with once its heartbeat
    watchdog gave the connection up (which only Python 3.11 and later
    can tell from a cancellation of the call)."""
    if lane == "new, cancelled" and sys.version_info < (3, 11):
        pytest.skip("Python before 3.11 takes every CancelledError for the caller's")
    written: List[bytes] = []

    class Transport:
        class connection:
            is_opened = False

            @staticmethod
            async def channel(**kwargs: Any) -> Any:
                # As aiormq's on a connection that ended.
                if lane == "new, cancelled":
                    raise asyncio.CancelledError
                raise Exception

    class Connection:
        is_closed = False
        transport = Transport()

    class Lane:
        is_closed = False

        async def basic_publish(self, body: bytes, **kwargs: Any) -> None:
            written.append(body)

    async def main() -> None:
        publisher = callme_publisher.Publisher(lanes=4)
        connection: Any = Connection()
        if lane == "idle":
            publisher._idle.append((connection, Lane()))
        with pytest.raises(callme_publisher.NotSent, match="was not sent"):
            await publisher.publish(
                connection, "calc", "server_calc_ex", b"{}", aiormq.spec.Basic.Properties()
            )
        assert written == []

    asyncio.run(main())


def test_an_exchange_share_is_a_quarter_of_the_lanes_and_leaves_no_entry() -> None:
    """The share's bookkeeping alone: at most a quarter of the lanes for one
    exchange, and no entry left once nobody holds or waits for one, a
    caller that stopped waiting included."""

    async def main() -> None:
        publisher = callme_publisher.Publisher(lanes=8)
        shares = publisher._shares

        def lane(exchange: str) -> Any:
            return callme_publisher._ExchangeLane(shares, exchange, publisher._exchange_lanes)

        held = [lane("a"), lane("a"), lane("b")]
        for each in held:
            await each.__aenter__()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(lane("a").__aenter__(), 0.05)
        assert sorted(shares) == ["a", "b"]
        for each in held:
            await each.__aexit__(None, None, None)
        assert shares == {}

    asyncio.run(main())


def test_calls_to_a_missing_server_leave_nothing_on_the_connection(
    amqp_url: str, host: Host
) -> None:
    """Each call to a server id nobody serves has its lane closed by the
    broker. Lanes opened through aio-pika left a callback (with its event,
    lock and task) on the connection for each, about 2 KB a call for the
    connection's life: a caller polling a server that is not up yet grew
    without bound."""

    async def main() -> None:
        async with callme.AsyncProxy(amqp_url=amqp_url, timeout=10) as proxy:
            assert await proxy.use_server(host.calc).add(1, 1) == 2
            assert proxy._link is not None
            connection = await proxy._link.connection()
            # aiormq's own closing future (aiormq 7 hands out observers of
            # it, each hanging a callback on it; aiormq 6 hands it out).
            underlay = connection.transport.connection
            closing = getattr(underlay, "_closing", None) or underlay.closing

            def callbacks() -> int:
                return len(closing._callbacks or [])

            before = callbacks()
            for _ in range(50):
                with pytest.raises(callme.NoSuchServer):
                    await proxy.use_server(host.missing).add(1, 1)
            await asyncio.sleep(0.2)
            assert callbacks() - before <= 2, f"{before} callbacks, then {callbacks()}"
            assert await proxy.use_server(host.calc).add(2, 3) == 5

    asyncio.run(main())


def test_a_proxy_used_from_another_event_loop_says_so(amqp_url: str, host: Host) -> None:
    """A proxy made at module level and used under two ``asyncio.run``s:
    the second loop's call waited out its whole timeout for a connection
    whose loop was gone, and said the broker could not be reached."""
    proxy = callme.AsyncProxy(amqp_url=amqp_url, timeout=10)

    async def first() -> None:
        assert await proxy.use_server(host.calc).add(1, 1) == 2

    async def second() -> None:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="event loop"):
            await proxy.use_server(host.calc).add(1, 1)
        assert time.monotonic() - started < 1

    asyncio.run(first())
    asyncio.run(second())


def test_a_proxy_whose_first_connect_failed_is_free_for_another_loop() -> None:
    """A program that tries again under a new ``asyncio.run`` after a
    first connect failed (the broker was down) gets a connection error
    again, not the other-loop refusal: nothing was bound to the first
    loop."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = callme.AsyncProxy(amqp_url=f"amqp://guest:guest@127.0.0.1:{port}/%2f", timeout=2)

    async def attempt() -> None:
        with pytest.raises(callme.ConnectionError):
            await proxy.use_server("calc").add(1, 1)

    asyncio.run(attempt())
    asyncio.run(attempt())


def test_a_connect_every_caller_gave_up_on_is_not_the_next_calls_error(
    amqp_url: str, host: Host
) -> None:
    """A first connect that outlived the one call waiting for it (a
    broker that takes the connection and never answers) failed after
    that call had given up. The next call, made once the broker answered
    again, got that stale failure instead of connecting."""
    import socket

    forwarder = Forwarder(amqp_url)
    forwarder.cut()
    # Takes connections on the forwarder's port and never answers.
    silent = socket.socket()
    silent.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    silent.bind(("127.0.0.1", forwarder.port))
    silent.listen()
    proxy = callme.AsyncProxy(f"{forwarder.url}?connection_timeout=2000", timeout=0.2)

    async def main() -> None:
        try:
            with pytest.raises(callme.ConnectionError, match="within the call's timeout"):
                await proxy.use_server(host.calc).add(1, 1)
            # The attempt fails at its own limit, with nobody waiting.
            attempt = proxy._starting
            assert attempt is not None
            await asyncio.wait({attempt}, timeout=10)
            assert attempt.done() and attempt.exception() is not None
            silent.close()
            forwarder.start()
            assert await proxy.use_server(host.calc, timeout=10).add(2, 3) == 5
        finally:
            await proxy.close()

    try:
        asyncio.run(main())
    finally:
        silent.close()
        forwarder.cut()
