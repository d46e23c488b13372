"""The blocking Client against a `pushchannel serve` subprocess (a blocking client must not
run on the test's event loop)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

import pushchannel
from pushchannel import Client, Message, OutgoingMessage, PublishResult

WAIT = 5.0


@pytest.fixture
def client(broker_process: str) -> Iterator[Client]:
    with Client(broker_process) as c:
        yield c


def take(messages: Iterator[Message], n: int, timeout: float = WAIT, ack: bool = False) -> list[Message]:
    """The next n messages, read (and acked, if asked) in a helper thread, so that a hang
    fails instead of blocking."""
    out: list[Message] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            for m in messages:
                out.append(m)
                if ack:
                    m.ack()
                if len(out) == n:
                    return
        except BaseException as e:
            failure.append(e)

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), f"only {len(out)} of {n} messages within {timeout} s"
    if failure:
        raise failure[0]
    return out


def test_round_trip(client: Client) -> None:
    assert client.publish("jobs", b"one", attributes={"k": "v"}, id="job-1") == PublishResult(1, False)
    assert client.publish("jobs", "two").seq == 2
    with client.subscribe("jobs") as sub:
        a, b = take(sub, 2)
        a.ack()
        b.ack()
    assert (a.payload, a.attributes, a.id, a.attempt) == (b"one", {"k": "v"}, "job-1", 1)
    assert b.payload == b"two"


def test_publish_many_and_duplicates(client: Client) -> None:
    results = client.publish_many("bulk", (f"m{i}" for i in range(1500)))
    assert [r.seq for r in results] == list(range(1, 1501))
    again = client.publish_many(
        "bulk", [OutgoingMessage(b"x", id="fixed"), OutgoingMessage(b"x", id="fixed")]
    )
    assert [r.duplicate for r in again] == [False, True]
    assert again[0].seq == again[1].seq == 1501
    received = take(client.subscribe("bulk", max_in_flight=500, auto_ack=True), 1501, timeout=20)
    assert [m.seq for m in received] == list(range(1, 1502))


def test_ack_and_nack(client: Client) -> None:
    client.publish_many("work", [b"a", b"b"])
    sub = client.subscribe("work", max_in_flight=1)
    (a,) = take(sub, 1)
    assert a.nack() is not None  # a plain call; the return value may be awaited, or not
    (a2,) = take(sub, 1)
    assert (a2.seq, a2.attempt) == (a.seq, 2)
    a2.ack()
    (b,) = take(sub, 1)
    assert (b.payload, b.attempt) == (b"b", 1)
    b.ack()
    sub.close()
    b.ack()  # after close: harmless


def test_acks_from_another_thread(client: Client) -> None:
    client.publish_many("threads", [str(i) for i in range(50)])
    sub = client.subscribe("threads", max_in_flight=10)
    received = take(sub, 50, ack=True)
    # Acks only free credit if they arrive: 50 messages through a window of 10 prove it.
    assert [m.seq for m in received] == list(range(1, 51))
    sub.close()


def test_acks_reach_the_broker(client: Client) -> None:
    client.publish_many("acked", [b"1", b"2"])
    with client.subscribe("acked", max_in_flight=2) as sub:
        for m in take(sub, 2):
            m.ack()
    client.publish("acked", b"3")
    with client.subscribe("acked") as sub:
        (m,) = take(sub, 1)
    assert (m.payload, m.attempt) == (b"3", 1)


def test_errors_are_translated(client: Client) -> None:
    with pytest.raises(pushchannel.InvalidArgument, match="A-Z a-z 0-9"):
        client.publish("bad channel!", b"x")
    with pytest.raises(pushchannel.InvalidArgument):
        take(client.subscribe("bad channel!"), 1)
    with pytest.raises(pushchannel.InvalidArgument):
        client.subscribe("bad channel!").open()


def test_unreachable_broker() -> None:
    retry = pushchannel.RetryPolicy(initial_backoff=0.05, max_backoff=0.2, deadline=0.5)
    with Client("127.0.0.1:1", retry=retry) as c, pytest.raises(pushchannel.Unavailable):
        c.publish("x", b"y")


def test_close_while_another_thread_iterates(broker_process: str) -> None:
    client = Client(broker_process)
    sub = client.subscribe("idle")
    sub.open()
    ended = threading.Event()
    received: list[Message] = []

    def consume() -> None:
        received.extend(sub)
        ended.set()

    threading.Thread(target=consume, daemon=True).start()
    time.sleep(0.2)
    started = time.monotonic()
    client.close()
    assert ended.wait(WAIT) and received == []
    assert time.monotonic() - started < WAIT
    client.close()  # idempotent
    with pytest.raises(RuntimeError):
        client.publish("idle", b"x")
    with pytest.raises(StopIteration):
        next(sub)


def test_close_before_any_use_and_with_an_unopened_subscription(broker_process: str) -> None:
    Client(broker_process).close()
    client = Client(broker_process)
    sub = client.subscribe("never")
    client.close()
    assert list(sub) == []


def test_subscription_close_from_another_thread(client: Client) -> None:
    sub = client.subscribe("stop-me")
    sub.open()
    done = threading.Event()

    def consume() -> None:
        list(sub)
        done.set()

    threading.Thread(target=consume, daemon=True).start()
    time.sleep(0.1)
    sub.close()
    assert done.wait(WAIT)
    sub.close()


def test_break_and_drop_closes_the_stream(client: Client) -> None:
    client.publish_many("drop", [str(i) for i in range(100)])
    for _ in range(10):
        for m in client.subscribe("drop", max_in_flight=1):
            m.ack()
            break
    with client.subscribe("drop") as sub:
        assert take(sub, 1)[0].payload
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < WAIT
