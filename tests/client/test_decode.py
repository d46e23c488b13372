"""How the SDK turns a frame's deliveries into Messages (no broker needed)."""

from __future__ import annotations

from datetime import UTC, datetime

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.client._stream import _messages


def _frame(*deliveries: pb.Delivery) -> pb.DeliveryBatch:
    return pb.DeliveryBatch.FromString(pb.DeliveryBatch(deliveries=deliveries).SerializeToString())


def test_every_field_is_carried_and_publish_times_stay_exact() -> None:
    t1, t2 = 1_700_000_000_123_456, 1_700_000_001_000_001
    frame = _frame(
        pb.Delivery(channel="c", seq=1, id="a", payload=b"1", publish_time_us=t1, attempt=1, delivery_tag=1),
        pb.Delivery(channel="c", seq=2, id="b", payload=b"2", publish_time_us=t1, attempt=2, delivery_tag=2),
        pb.Delivery(
            channel="c",
            seq=3,
            id="c",
            payload=b"3",
            attributes={"k": "v"},
            publish_time_us=t2,
            delivery_tag=3,
        ),
        pb.Delivery(channel="c", seq=4, id="d", payload=b"4", publish_time_us=t1, attempt=1, delivery_tag=4),
    )
    got = _messages(frame.deliveries, None)
    assert [(m.channel, m.seq, m.id, m.payload, m.attempt, m.delivery_tag) for m in got] == [
        ("c", 1, "a", b"1", 1, 1),
        ("c", 2, "b", b"2", 2, 2),
        ("c", 3, "c", b"3", 0, 3),
        ("c", 4, "d", b"4", 1, 4),
    ]
    first = datetime(2023, 11, 14, 22, 13, 20, 123456, tzinfo=UTC)
    assert [m.publish_time for m in got] == [
        first,
        first,
        datetime(2023, 11, 14, 22, 13, 21, 1, tzinfo=UTC),
        first,
    ]
    assert [m.attributes for m in got] == [{}, {}, {"k": "v"}, {}]


def test_each_message_gets_an_attribute_dict_of_its_own() -> None:
    frame = _frame(pb.Delivery(seq=1), pb.Delivery(seq=2))
    a, b = _messages(frame.deliveries, None)
    a.attributes["mine"] = "x"
    assert b.attributes == {}
