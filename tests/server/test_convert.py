"""The servicers' protobuf conversions: every field carried, in order, whatever way they are built."""

from __future__ import annotations

from pushchannel._proto.pushchannel.v1 import broker_pb2 as pb
from pushchannel.core.model import NewMessage, Stored
from pushchannel.server import convert


def test_deliveries_carry_every_field_in_batch_order() -> None:
    batch = [
        Stored(7, "id-7", b"seven", {}, 1_700_000_000.25),
        Stored(8, "id-8", b"eight", {"k": "v", "x": "y"}, 1_700_000_001.5, attempt=3),
        Stored(9, "", b"", {}, 0.0),
    ]
    frame = pb.SubscribeResponse.FromString(convert.deliveries("ch.a", batch).SerializeToString())
    assert frame.WhichOneof("kind") == "deliveries"
    got = list(frame.deliveries.deliveries)
    assert [d.seq for d in got] == [7, 8, 9]
    assert [d.delivery_tag for d in got] == [7, 8, 9]
    assert [d.channel for d in got] == ["ch.a"] * 3
    assert [d.id for d in got] == ["id-7", "id-8", ""]
    assert [d.payload for d in got] == [b"seven", b"eight", b""]
    assert [dict(d.attributes) for d in got] == [{}, {"k": "v", "x": "y"}, {}]
    assert [d.publish_time_us for d in got] == [1_700_000_000_250_000, 1_700_000_001_500_000, 0]
    assert [d.attempt for d in got] == [1, 3, 1]


def test_publish_response_keeps_order_duplicates_and_ref() -> None:
    response = convert.publish_response([(5, False), (3, True), (6, False)], ref=42)
    parsed = pb.PublishResponse.FromString(response.SerializeToString())
    assert parsed.ref == 42
    assert [(r.seq, r.duplicate) for r in parsed.results] == [(5, False), (3, True), (6, False)]
    assert not parsed.error_code


def test_new_messages_copy_fields_and_attributes() -> None:
    request = pb.PublishRequest(
        channel="c",
        messages=[
            pb.Message(payload=b"a", id="m1", attributes={"k": "v"}, ttl_ms=1500),
            pb.Message(payload=b"b"),
        ],
    )
    got = convert.new_messages(pb.PublishRequest.FromString(request.SerializeToString()))
    assert got == [NewMessage(b"a", "m1", {"k": "v"}, 1.5), NewMessage(b"b", "", {}, 0.0)]
    assert type(got[0].attributes) is dict  # a copy, not the request's map
