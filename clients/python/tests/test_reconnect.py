"""A lost connection: waiting calls fail at once, later calls work again.

The broker closes this proxy's connection only (found by its connection
name), which is what a proxy sees of a broker restart, without restarting
the broker other suites share.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from typing import Any, List

import pytest

import callme_client as callme
import callme_client.link as callme_link
import callme_client.proxy as callme_proxy
import callme_client.publisher as callme_publisher
from conftest import BrokerUser, Forwarder, Host, close_connection, rabbitmqctl, url_for
from raw_amqp import NESTED, NOT_UTF8, publish_unreadable


def counting_sent(monkeypatch: pytest.MonkeyPatch) -> "List[int]":
    """A list that grows by one as each request is confirmed by the
    broker: its call then waits for its reply, and a lost connection
    fails it (a call still being sent waits for the next connection)."""
    sent: List[int] = []
    publish = callme_publisher.Publisher.publish

    async def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        done = await publish(self, *args, **kwargs)
        sent.append(1)
        return done

    monkeypatch.setattr(callme_publisher.Publisher, "publish", counted)
    return sent


async def until_sent(sent: "List[int]", requests: int, limit: float = 15.0) -> None:
    """Waits, on the proxy's loop, until ``requests`` were confirmed."""
    deadline = time.monotonic() + limit
    while len(sent) < requests:
        assert time.monotonic() < deadline, f"{len(sent)} of {requests} requests were sent"
        await asyncio.sleep(0.02)


def call_until_answered(server: callme.ServerProxy, limit: float = 10.0) -> float:
    start = time.monotonic()
    while True:
        try:
            assert server.add(1, 2) == 3
            return time.monotonic() - start
        except callme.ConnectionError:
            if time.monotonic() - start > limit:
                raise
            time.sleep(0.05)


def test_a_waiting_call_fails_and_the_proxy_reconnects(
    amqp_url: str, host: Host, broker_users: "List[BrokerUser]", caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    user = broker_users[0]
    name = f"callme-py-reconnect-{uuid.uuid4().hex[:8]}"
    with callme.Proxy(url_for(amqp_url, user.name, user.password), timeout=40,
                      connection_name=name) as proxy:
        calc = proxy.use_server(host.calc)
        assert calc.add(1, 1) == 2
        outcome: List[BaseException] = []

        def waiting() -> None:
            try:
                # Longer than rabbitmqctl takes to close the connection
                # on a loaded machine (an Erlang VM started for it).
                calc.call("slow-version", 30000)
            except BaseException as e:
                outcome.append(e)

        sent = counting_sent(monkeypatch)
        thread = threading.Thread(target=waiting)
        thread.start()
        deadline = time.monotonic() + 15
        while not sent:
            assert time.monotonic() < deadline, "the call was not sent"
            time.sleep(0.02)
        close_connection(name)
        closed_at = time.monotonic()
        thread.join(timeout=20)
        assert len(outcome) == 1 and isinstance(outcome[0], callme.ConnectionError)
        assert time.monotonic() - closed_at < 3  # at once, not when the 30 s call ends
        call_until_answered(calc)
        # Twice: the second connection is looked after as the first was.
        close_connection(name)
        call_until_answered(calc)
        answers = [calc.add(i, 1) for i in range(20)]
        assert answers == [i + 1 for i in range(20)]

    logged = caplog.text
    assert "lost the connection" in logged and "reconnected" in logged
    assert user.password not in logged
    assert any(r.name == "callme.proxy" for r in caplog.records)


def test_the_async_proxy_reconnects_too(
    amqp_url: str, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"callme-py-reconnect-async-{uuid.uuid4().hex[:8]}"
    sent = counting_sent(monkeypatch)

    async def main() -> None:
        async with callme.AsyncProxy(amqp_url, timeout=40, connection_name=name) as proxy:
            calc = proxy.use_server(host.calc)
            # Longer than rabbitmqctl takes to close the connection on a
            # loaded machine (an Erlang VM started for it).
            slow = [asyncio.ensure_future(calc.call("slow-version", 30000)) for _ in range(3)]
            await until_sent(sent, 3)
            await asyncio.get_running_loop().run_in_executor(None, close_connection, name)
            closed_at = time.monotonic()
            outcomes = await asyncio.gather(*slow, return_exceptions=True)
            assert time.monotonic() - closed_at < 3
            assert all(isinstance(o, callme.ConnectionError) for o in outcomes), outcomes
            start = time.monotonic()
            while True:
                try:
                    results = await asyncio.gather(*(calc.add(i, 1) for i in range(100)))
                    break
                except callme.ConnectionError:
                    assert time.monotonic() - start < 10
                    await asyncio.sleep(0.05)
            assert results == [i + 1 for i in range(100)]

    asyncio.run(main())


def test_an_idle_blocking_proxy_reconnects_without_being_called(
    amqp_url: str, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    # Between calls no caller runs the proxy's event loop: its idle tick
    # must, or a lost connection would only be noticed by the next call.
    caplog.set_level(logging.INFO, logger="callme.proxy")
    name = f"callme-py-idle-{uuid.uuid4().hex[:8]}"
    with callme.Proxy(amqp_url, timeout=20, connection_name=name) as proxy:
        calc = proxy.use_server(host.calc)
        assert calc.add(1, 1) == 2
        close_connection(name)
        deadline = time.monotonic() + 15
        while "reconnected" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "lost the connection" in caplog.text and "reconnected" in caplog.text
        assert calc.add(2, 2) == 4


def test_a_deleted_reply_queue_is_declared_again(
    amqp_url: str, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    # The broker cancels the consumer of a deleted queue and leaves the
    # channel open: nothing closes, yet no reply can come.
    caplog.set_level(logging.INFO, logger="callme.proxy")
    with callme.Proxy(amqp_url, timeout=5) as proxy:
        calc = proxy.use_server(host.calc)
        assert calc.add(1, 1) == 2
        exchange = proxy.reply_exchange
        assert exchange is not None
        rabbitmqctl("delete_queue", exchange.replace("_ex_", "_queue_", 1))
        assert call_until_answered(calc) < 5
        assert [calc.add(i, 1) for i in range(20)] == [i + 1 for i in range(20)]
    assert "cancelled the reply consumer" in caplog.text


def test_a_reconnection_attempt_aiormq_cancels_is_tried_again(
    amqp_url: str, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiormq fails what waits on a connection it gives up (its heartbeat
    watchdog, say, while the broker is half there) with a CancelledError of
    its own. A reconnection attempt that ends so is one that failed, and the
    next one follows, even where a task cannot tell that error from its own
    cancellation (before Python 3.11; played here by having every
    CancelledError look like the caller's)."""
    monkeypatch.setattr(callme_publisher, "cancelled_by_caller", lambda: True)
    monkeypatch.setattr(callme_link, "cancelled_by_caller", lambda: True, raising=False)
    opened = callme_link.Link._open
    opens: List[int] = []

    async def cancelled_once_when_reopening(self: callme_link.Link) -> Any:
        opens.append(1)
        if len(opens) == 2:
            raise asyncio.CancelledError()
        return await opened(self)

    monkeypatch.setattr(callme_link.Link, "_open", cancelled_once_when_reopening)
    name = f"callme-py-reconnect-cancelled-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with callme.AsyncProxy(amqp_url, timeout=20, connection_name=name) as proxy:
            calc = proxy.use_server(host.calc)
            assert await calc.add(1, 1) == 2
            await asyncio.get_running_loop().run_in_executor(None, close_connection, name)
            start = time.monotonic()
            while True:
                try:
                    assert await calc.add(1, 2) == 3
                    break
                except callme.ConnectionError:
                    assert time.monotonic() - start < 10, "the link stopped reconnecting"
                    await asyncio.sleep(0.05)
            assert len(opens) >= 3

    asyncio.run(main())


def test_a_reconnection_attempt_interrupted_is_tried_again(
    amqp_url: str, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt surfacing in a reconnection attempt (Ctrl-C
    while the caller's thread runs the proxy's loop) reaches that thread,
    and ends that attempt only: the link goes on trying, where it used to
    stop for good, every later call waiting out its timeout."""
    opened = callme_link.Link._open
    opens: List[int] = []

    async def interrupted_once_when_reopening(self: callme_link.Link) -> Any:
        opens.append(1)
        if len(opens) == 2:
            raise KeyboardInterrupt()
        return await opened(self)

    monkeypatch.setattr(callme_link.Link, "_open", interrupted_once_when_reopening)
    name = f"callme-py-reconnect-interrupted-{uuid.uuid4().hex[:8]}"
    with callme.Proxy(amqp_url, timeout=3, connection_name=name) as proxy:
        calc = proxy.use_server(host.calc)
        assert calc.add(1, 1) == 2
        close_connection(name)
        start = time.monotonic()
        while True:
            try:
                assert calc.add(1, 2) == 3
                break
            except (KeyboardInterrupt, callme.ConnectionError, callme.Timeout):
                pass
            assert time.monotonic() - start < 15, "the link stopped reconnecting"
            time.sleep(0.05)
        assert len(opens) >= 3


def test_a_ctrl_c_while_the_reply_queue_is_set_up_again_is_raised_once(
    amqp_url: str, host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KeyboardInterrupt in a reconnection's set-up of the reply queue
    reaches the thread running the loop once. Set up under
    ``asyncio.wait_for``, which before Python 3.12 runs it in a task of
    its own, it was raised there a second time, from the attempt awaiting
    that task: one Ctrl-C interrupted two calls. The proxy's own thread
    is kept from running the loop: a reconnection it ran while nobody
    called would take the interrupt there, where it is swallowed (a real
    Ctrl-C never reaches that thread: Python runs signal handlers in the
    main thread only)."""
    import aiormq
    import pamqp.commands

    monkeypatch.setattr(callme_proxy, "IDLE_TICK", 60.0)
    rpc = aiormq.Channel.rpc
    declares: List[int] = []

    async def interrupted_once_when_declared_again(
        self: Any, frame: Any, *args: Any, **kwargs: Any
    ) -> Any:
        if isinstance(frame, pamqp.commands.Queue.Declare):
            declares.append(1)
            if len(declares) == 2:
                raise KeyboardInterrupt()
        return await rpc(self, frame, *args, **kwargs)

    monkeypatch.setattr(aiormq.Channel, "rpc", interrupted_once_when_declared_again)
    name = f"callme-py-reconnect-ctrl-c-{uuid.uuid4().hex[:8]}"
    interrupted = 0
    with callme.Proxy(amqp_url, timeout=3, connection_name=name) as proxy:
        calc = proxy.use_server(host.calc)
        assert calc.add(1, 1) == 2
        close_connection(name)
        start = time.monotonic()
        answered = 0
        # This thread calls without a pause, so it runs the loop when the
        # interrupt surfaces, each time.
        while answered < 20:
            try:
                assert calc.add(1, 2) == 3
                answered += 1
            except KeyboardInterrupt:
                interrupted += 1
            except (callme.ConnectionError, callme.Timeout):
                pass
            assert time.monotonic() - start < 15, "the link stopped reconnecting"
    assert len(declares) >= 3
    assert interrupted == 1


def test_the_reply_queue_is_named_anew_for_each_connection(
    amqp_url: str, host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    """Any server a proxy calls learns its reply queue's name, and anyone
    who may write there can end the proxy's connection with one message
    the AMQP library cannot read. Named as before, the queue was there to
    be written to again the moment the proxy was back; named anew, a
    server must be called again to learn it."""
    caplog.set_level(logging.INFO, logger="callme.proxy")
    name = f"callme-py-renamed-{uuid.uuid4().hex[:8]}"
    with callme.Proxy(amqp_url, timeout=20, connection_name=name) as proxy:
        calc = proxy.use_server(host.calc)
        assert calc.add(1, 1) == 2
        before = proxy.reply_exchange
        assert before is not None
        close_connection(name)
        assert call_until_answered(calc) < 15
        after = proxy.reply_exchange
        assert after is not None and after != before
        assert after.startswith(before[: before.index("_ex_") + 4])
        # The old queue is deleted once the proxy is back.
        assert queue_gone(before.replace("_ex_", "_queue_", 1))
        assert after.replace("_ex_", "_queue_", 1) in rabbitmqctl("list_queues", "name")


def queue_gone(queue: str, limit: float = 10.0) -> bool:
    """Whether the broker no longer has ``queue``, or not within ``limit`` s."""
    deadline = time.monotonic() + limit
    while queue in rabbitmqctl("list_queues", "name").split():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


@pytest.mark.parametrize("kind", [NOT_UTF8, NESTED])
def test_an_unreadable_reply_costs_the_calls_waiting_nothing(
    amqp_url: str,
    host: Host,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
) -> None:
    """Whoever may publish to a proxy's reply exchange (every server it
    calls learns the name) can send it a message aiormq cannot read (a
    short string that is not UTF-8, or headers nested deeper than pamqp's
    decoder recurses), and that ends the proxy's connection. The reply
    queue outlives it: the calls waiting get their replies from it all the
    same, taken on a connection of its own, which a second such message
    to the old names costs nothing but itself; the proxy goes on under new
    names."""
    caplog.set_level(logging.INFO, logger="callme.proxy")
    name = f"callme-py-unreadable-{uuid.uuid4().hex[:8]}"

    async def main() -> None:
        async with callme.AsyncProxy(amqp_url, timeout=30, connection_name=name) as proxy:
            calc = proxy.use_server(host.calc)
            assert await calc.add(1, 1) == 2
            before = proxy.reply_exchange
            assert before is not None
            queue = before.replace("_ex_", "_queue_", 1)
            listed = rabbitmqctl("list_queues", "--no-table-headers", "-q", "name", "durable",
                                 "exclusive", "arguments")
            line = next(row for row in listed.splitlines() if row.startswith(queue))
            # Durable and not exclusive, classic, expiring (RabbitMQ 4.x
            # refuses a queue that is neither durable nor exclusive).
            assert "\ttrue\tfalse\t" in line and "x-expires" in line and "classic" in line, line
            sent = counting_sent(monkeypatch)
            slow = [asyncio.ensure_future(calc.call("slow-version", 4000)) for _ in range(4)]
            # Their requests confirmed (one still being sent when the
            # connection goes fails with it, by design).
            await until_sent(sent, 4)
            await asyncio.to_thread(publish_unreadable, amqp_url, before, kind)
            deadline = time.monotonic() + 15
            while proxy.reply_exchange == before or not proxy._link or not proxy._link.connected:
                assert time.monotonic() < deadline, "the proxy did not come back"
                await asyncio.sleep(0.05)
            assert await calc.add(2, 3) == 5
            # Again to the old names, while the slow calls wait: it ends
            # the connection reading the old queue, and nothing else.
            await asyncio.to_thread(publish_unreadable, amqp_url, before, kind)
            answered = await asyncio.gather(*slow, return_exceptions=True)
            assert answered == ["1"] * 4, answered
            assert await calc.add(3, 4) == 7
            assert proxy.reply_exchange != before
        assert caplog.text.count("lost the connection") == 1, caplog.text
        # Once the first, put back when its consumer's connection ended,
        # and once the second, which ended only the drain's connection.
        assert caplog.text.count("took out a reply the AMQP library cannot read") >= 2
        # Once nobody waits for it, the old queue is deleted.
        assert queue_gone(queue)

    asyncio.run(main())


@pytest.mark.parametrize(
    "idle_tick, pause",
    [("as shipped", 0.3), ("never while the test runs", 0.3), ("as shipped", 0.005)],
    ids=["seen by the idle tick", "seen by the call", "right after the last call"],
)
def test_a_call_made_while_the_broker_is_away_waits_for_it(
    amqp_url: str, host: Host, idle_tick: str, pause: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call made while the proxy reconnects waits for the connection,
    within its own timeout, and is answered: the broker (a forwarder) goes
    away, a call is made ``pause`` later, and the broker is back 1.5 s
    after that. Whether the proxy's idle tick has seen the loss by then,
    or (its tick put off) the call must see it itself before it is sent;
    and a call made a few milliseconds after the last one, when the end of
    the connection waits unread (nobody ran the loop in between), must
    take it in before it sends anything, not be sent on the connection
    that is going and fail with it."""
    if idle_tick != "as shipped":
        monkeypatch.setattr(callme_proxy, "IDLE_TICK", 60.0)
    node = Forwarder(amqp_url)
    try:
        with callme.Proxy(node.url, timeout=10) as proxy:
            calc = proxy.use_server(host.calc)
            assert calc.add(1, 2) == 3
            node.cut()
            time.sleep(pause)
            outcome: List[Any] = []
            call = threading.Thread(target=lambda: outcome.append(_attempt(calc)))
            call.start()
            call.join(timeout=1.5)
            assert call.is_alive(), f"the call ended while the broker was away: {outcome}"
            node.start()
            call.join(timeout=15)
            assert outcome == [5]
    finally:
        node.cut()


def test_an_idle_proxy_reconnects_within_a_short_connection_timeout(
    amqp_url: str, host: Host
) -> None:
    """A blocking proxy nobody calls has its loop run by its own thread a
    few times a second; a reconnection, a dozen round trips to the
    broker, must still go at the broker's pace: with each attempt given
    1 s (``connection_timeout=1000``), the proxy is connected again while
    idle once the broker is back. Run one round trip a tick, every attempt
    ran out its second."""
    node = Forwarder(amqp_url)
    try:
        with callme.Proxy(f"{node.url}?connection_timeout=1000", timeout=10) as proxy:
            calc = proxy.use_server(host.calc)
            assert calc.add(1, 2) == 3
            link = proxy._async._link
            assert link is not None
            node.cut()
            time.sleep(0.5)
            node.start()
            deadline = time.monotonic() + 20
            # Looked at from here, a flag: no call runs the loop meanwhile.
            while not link.connected:
                assert time.monotonic() < deadline, "the idle proxy did not reconnect"
                time.sleep(0.05)
            assert calc.add(2, 3) == 5
    finally:
        node.cut()


@pytest.mark.parametrize("made", ["once the proxy knows", "before the proxy knows"])
def test_an_awaited_call_made_while_the_broker_is_away_waits_for_it(
    amqp_url: str, host: Host, made: str
) -> None:
    """As above, awaited: a call made 0.3 s after the broker went away
    waits for the next connection and is answered. And one made in the
    passes of the event loop (some twenty) aiormq takes from reading the
    end of its connection to telling the proxy, the loop run for a few
    passes only (as a blocking proxy's caller runs it): it must not be
    sent on the connection that is going, and fail with it."""
    node = Forwarder(amqp_url)

    async def main() -> None:
        async with callme.AsyncProxy(node.url, timeout=10) as proxy:
            calc = proxy.use_server(host.calc)
            assert await calc.add(1, 2) == 3
            link = proxy._link
            assert link is not None
            going = link._connection
            assert going is not None and going.transport is not None
            underlay = going.transport.connection
            node.cut()
            if made == "once the proxy knows":
                await asyncio.sleep(0.3)
            else:
                # The end reaches the socket while the loop is not run.
                time.sleep(0.3)
                passes = 0
                while underlay.is_opened:
                    passes += 1
                    assert passes < 100, "aiormq never read the end of its connection"
                    await asyncio.sleep(0)
                # aiormq knows; the proxy does not, yet.
                assert link._connection is going and not going.is_closed
            call = asyncio.ensure_future(calc.add(2, 3))
            await asyncio.sleep(1.5)
            assert not call.done(), f"the call ended while the broker was away: {call}"
            node.start()
            assert await asyncio.wait_for(call, 15) == 5

    try:
        asyncio.run(main())
    finally:
        node.cut()


@pytest.mark.parametrize("lane", ["an idle lane", "a new lane", "a lane waited for"])
def test_a_call_whose_connection_goes_before_its_request_is_written_is_sent_on_the_next(
    amqp_url: str, host: Host, lane: str
) -> None:
    """A call that took the connection, and loses it before its request is
    written (while it waits for a lane, or opens one, or before the proxy
    is told), has sent nothing: it waits for the next connection, within
    its timeout, and is answered there, rather than failing with a
    ``ConnectionError`` it could do nothing about."""
    node = Forwarder(amqp_url)

    async def main() -> None:
        async with callme.AsyncProxy(node.url, timeout=10) as proxy:
            calc = proxy.use_server(host.calc)
            assert await calc.add(1, 2) == 3
            link, publisher = proxy._link, proxy._publisher
            assert link is not None and publisher is not None
            going = link._connection
            assert going is not None and going.transport is not None
            underlay = going.transport.connection

            async def lose() -> None:
                node.cut()
                # The end reaches the socket while the loop is not run;
                # then only until aiormq's reader has read it.
                time.sleep(0.3)
                passes = 0
                while underlay.is_opened:
                    passes += 1
                    assert passes < 100, "aiormq never read the end of its connection"
                    await asyncio.sleep(0)
                assert link._connection is going and not going.is_closed, "the proxy knows"

            if lane == "a lane waited for":
                for _ in range(callme_publisher.LANES):
                    await publisher._lanes.acquire()
                call = asyncio.ensure_future(calc.add(2, 3))
                await asyncio.sleep(0.1)
                assert not call.done() and publisher._lanes.locked()
                await lose()
                for _ in range(callme_publisher.LANES):
                    publisher._lanes.release()
            else:
                if lane == "a new lane":
                    publisher.clear()
                else:
                    idle = publisher._take(going)
                    assert idle is not None, "no idle lane"
                    publisher._give_back(going, idle)
                taken = link.connection
                lost: List[bool] = []

                async def lost_once_taken() -> Any:
                    connection = await taken()
                    if not lost:
                        lost.append(True)
                        await lose()
                    return connection

                setattr(link, "connection", lost_once_taken)
                call = asyncio.ensure_future(calc.add(2, 3))
            await asyncio.sleep(1.5)
            assert not call.done(), f"the call ended while the broker was away: {call}"
            node.start()
            assert await asyncio.wait_for(call, 15) == 5

    try:
        asyncio.run(main())
    finally:
        node.cut()


def _attempt(server: callme.ServerProxy) -> Any:
    try:
        return server.add(2, 3)
    except BaseException as e:  # reported by the test
        return e


def test_a_proxy_refused_its_reply_queue_says_so_at_once(amqp_url: str, host: Host) -> None:
    """A proxy whose user may no longer declare its reply queue (the
    permission taken away, then its connection lost) fails calls at once
    with ``AccessRefused``, saying why, rather than letting each wait out
    its timeout; given the permission back, it is answered again."""
    tag = uuid.uuid4().hex[:8]
    user = BrokerUser(f"py-unqueued-{tag}", f"pw-{uuid.uuid4().hex}")
    rabbitmqctl("add_user", user.name, user.password)
    rabbitmqctl("set_permissions", "-p", "/", user.name, ".*", ".*", ".*")
    name = f"callme-py-unqueued-{tag}"
    try:
        url = url_for(amqp_url, user.name, user.password)
        with callme.Proxy(url, timeout=20, connection_name=name) as proxy:
            calc = proxy.use_server(host.calc)
            assert calc.add(1, 2) == 3
            rabbitmqctl("set_permissions", "-p", "/", user.name, "^$", ".*", ".*")
            close_connection(name)
            limit = time.monotonic() + 15
            while True:
                try:
                    calc.add(2, 3)
                except callme.AccessRefused as e:
                    assert "reply queue" in str(e)
                    break
                except callme.ConnectionError:
                    pass
                assert time.monotonic() < limit, "never refused"
                time.sleep(0.05)
            # At once, not when its 20 s are up.
            with pytest.raises(callme.AccessRefused):
                calc.add(2, 3)
            rabbitmqctl("set_permissions", "-p", "/", user.name, ".*", ".*", ".*")
            limit = time.monotonic() + 15
            while True:
                try:
                    assert calc.add(2, 3) == 5
                    break
                except (callme.AccessRefused, callme.ConnectionError):
                    assert time.monotonic() < limit, "not answered again"
                    time.sleep(0.1)
    finally:
        rabbitmqctl("delete_user", user.name)
