"""The queue checker itself, on histories made up by hand: it must see each kind of failure."""

from __future__ import annotations

from tests.durability.checker import History, check, payload_for


def history(*published: tuple[str, int], attempts: int = 1) -> History:
    h = History()
    for message_id, seq in published:
        for _ in range(attempts):
            h.attempted([message_id])
        h.answered(message_id, seq, False)
    return h


def test_a_clean_history_with_redeliveries() -> None:
    h = history(("a", 1), ("b", 2))
    h.attempted(["c"])  # never answered, but stored and delivered: recovered, not unexpected
    for i, seq, attempt in [("a", 1, 1), ("b", 2, 1), ("a", 1, 2), ("c", 3, 1)]:
        h.delivered(i, seq, payload_for(i), attempt)
    report = check(h)
    assert report.line() == "acked-published 2, delivered 3, lost 0, duplicates 1, unexpected 0"
    assert report.ok
    assert report.recovered == ["c"]
    assert report.deliveries == 4


def test_a_lost_message() -> None:
    h = history(("a", 1), ("b", 2))
    h.delivered("a", 1, payload_for("a"), 1)
    report = check(h)
    assert report.lost == ["b"]
    assert not report.ok
    assert "lost 1" in report.line()


def test_unexpected_messages_and_payloads() -> None:
    h = history(("a", 1))
    h.delivered("a", 1, b"something else", 1)
    h.delivered("z", 2, payload_for("z"), 1)
    report = check(h)
    assert report.unexpected == ["a", "z"]
    assert not report.ok


def test_a_message_stored_twice_is_a_seq_problem() -> None:
    h = history(("a", 1), attempts=2)
    h.answered("a", 2, False)  # the retry was stored again under a new seq
    h.delivered("a", 1, payload_for("a"), 1)
    h.delivered("a", 2, payload_for("a"), 1)
    report = check(h)
    assert report.lost == [] and report.unexpected == []
    assert report.seq_problems[0] == "id a has seqs [1, 2]"
    assert not report.ok


def test_two_ids_on_one_seq_and_a_duplicate_answer_without_a_retry() -> None:
    h = history(("a", 1))
    h.attempted(["b"])
    h.answered("b", 1, True)
    report = check(h)
    assert "seq 1 carries ids ['a', 'b']" in report.seq_problems
    assert "id b was answered duplicate=true on its first and only attempt" in report.seq_problems


def test_a_redelivery_that_claims_to_be_the_first() -> None:
    h = history(("a", 1))
    h.delivered("a", 1, payload_for("a"), 1)
    h.delivered("a", 1, payload_for("a"), 1)
    report = check(h)
    assert report.seq_problems == ["id a was delivered 2 times with attempt 1"]
    assert not report.ok
