"""A queue checker in the manner of Jepsen's ``total-queue``: from what producers were told and
what consumers received, the messages lost, duplicated and unexpected.

- *acked-published*: messages whose publish was answered (a seq came back);
- *delivered*: distinct messages that reached a consumer;
- *lost*: acked-published but never delivered (must be 0);
- *duplicates*: messages delivered more than once (allowed: delivery is at-least-once);
- *unexpected*: delivered but never published, or delivered with another payload (must be 0);
- *recovered*: delivered although no publish of it was ever answered (allowed).

On top of Jepsen's figures it checks the seqs, which is how "stored once" shows: every id has
exactly one seq (among publish answers, retried or not, and deliveries) and no two ids share one.
It also checks that a redelivery says so: no message is delivered twice with ``attempt`` 1.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field


def payload_for(message_id: str) -> bytes:
    """Each message's payload is derived from its id, so a delivery identifies its message."""
    return f"payload of {message_id}".encode()


@dataclass
class History:
    """Everything the clients saw. Producers call ``attempted`` before sending a publish and
    ``answered`` for each result; consumers call ``delivered`` before acking."""

    attempts: Counter[str] = field(default_factory=Counter)
    answers: dict[str, list[tuple[int, bool]]] = field(default_factory=lambda: defaultdict(list))
    deliveries: list[tuple[str, int, bytes, int]] = field(default_factory=list)

    def attempted(self, ids: list[str]) -> None:
        self.attempts.update(ids)

    def answered(self, message_id: str, seq: int, duplicate: bool) -> None:
        self.answers[message_id].append((seq, duplicate))

    def delivered(self, message_id: str, seq: int, payload: bytes, attempt: int) -> None:
        self.deliveries.append((message_id, seq, payload, attempt))

    def acked_ids(self) -> set[str]:
        return set(self.answers)

    def delivered_ids(self) -> set[str]:
        return {d[0] for d in self.deliveries}


@dataclass
class Report:
    acked_published: int
    delivered: int
    lost: list[str]
    duplicates: list[str]
    unexpected: list[str]
    recovered: list[str]
    deliveries: int
    retries: int
    duplicate_answers: int
    seq_problems: list[str]

    def line(self) -> str:
        return (
            f"acked-published {self.acked_published}, delivered {self.delivered}, "
            f"lost {len(self.lost)}, duplicates {len(self.duplicates)}, unexpected {len(self.unexpected)}"
        )

    def details(self) -> str:
        return (
            f"{self.line()}\n"
            f"recovered {len(self.recovered)}, deliveries {self.deliveries}, publish retries {self.retries}, "
            f"answers with duplicate=true {self.duplicate_answers}, seq problems {len(self.seq_problems)}\n"
            f"lost (first 10): {self.lost[:10]}\n"
            f"unexpected (first 10): {self.unexpected[:10]}\n"
            f"seq problems (first 10): {self.seq_problems[:10]}"
        )

    @property
    def ok(self) -> bool:
        return not self.lost and not self.unexpected and not self.seq_problems


def check(history: History) -> Report:
    acked = history.acked_ids()
    counts = Counter(d[0] for d in history.deliveries)
    delivered = set(counts)
    unexpected = {i for i in delivered if i not in history.attempts}
    unexpected.update(i for i, _, payload, _ in history.deliveries if payload != payload_for(i))

    seqs_of: dict[str, set[int]] = defaultdict(set)
    for i, answers in history.answers.items():
        seqs_of[i].update(seq for seq, _ in answers)
    for i, seq, _, _ in history.deliveries:
        seqs_of[i].add(seq)
    problems = [f"id {i} has seqs {sorted(s)}" for i, s in seqs_of.items() if len(s) != 1]
    ids_of: dict[int, set[str]] = defaultdict(set)
    for i, s in seqs_of.items():
        for seq in s:
            ids_of[seq].add(i)
    problems += [f"seq {seq} carries ids {sorted(i)}" for seq, i in ids_of.items() if len(i) != 1]
    first_attempts = Counter(i for i, _, _, attempt in history.deliveries if attempt == 1)
    problems += [f"id {i} was delivered {n} times with attempt 1" for i, n in first_attempts.items() if n > 1]
    for i, answers in history.answers.items():
        if answers[0][1] and history.attempts[i] == 1:
            problems.append(f"id {i} was answered duplicate=true on its first and only attempt")

    return Report(
        acked_published=len(acked),
        delivered=len(delivered),
        lost=sorted(acked - delivered),
        duplicates=sorted(i for i, n in counts.items() if n > 1),
        unexpected=sorted(unexpected),
        recovered=sorted(delivered - acked - unexpected),
        deliveries=len(history.deliveries),
        retries=sum(history.attempts.values()) - len(history.attempts),
        duplicate_answers=sum(1 for a in history.answers.values() for _, dup in a if dup),
        seq_problems=problems,
    )
