"""The worker's lanes: order per (partition, key), concurrency across keys, and an
offset committed only past records whose outcome is recorded."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import ConsumerRecord, TopicPartition

from channels.delivery import Outcome
from channels.worker import _Lanes

TOPIC = "notify.email"
TP = TopicPartition(TOPIC, 0)


def record(offset: int, key: bytes, partition: int = 0) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(TOPIC, partition, offset, 0, 0, key, b"", None, len(key), 0, [])


class Gate:
    """Each record's handling waits until the test releases its offset."""

    def __init__(self) -> None:
        self.released: dict[int, asyncio.Event] = {}
        self.started: list[int] = []

    async def handle(self, rec: ConsumerRecord[bytes, bytes]) -> Outcome:
        self.started.append(rec.offset)
        await self.released.setdefault(rec.offset, asyncio.Event()).wait()
        return Outcome.DELIVERED

    def release(self, offset: int) -> None:
        self.released.setdefault(offset, asyncio.Event()).set()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)  # let the lane tasks run up to their next wait


async def test_a_slow_record_holds_only_its_own_lane_and_the_offset_behind_it() -> None:
    gate = Gate()
    lanes = _Lanes(gate.handle)
    lanes.add([record(0, b"a"), record(1, b"b"), record(2, b"a"), record(3, b"b")])
    await settle()
    assert sorted(gate.started) == [0, 1]  # one record per key at a time, keys concurrently

    gate.release(1)
    await settle()
    assert sorted(gate.started) == [0, 1, 3]  # key b moves on while key a is stuck
    assert lanes.committable() == {}  # offset 0 has no outcome yet: nothing may be committed

    gate.release(3)
    gate.release(0)
    await settle()
    assert lanes.committable() == {TP: 2}  # 0 and 1 done; 2 (key a) has just started
    gate.release(2)
    await lanes.finish()
    assert lanes.committable() == {TP: 4}
    assert lanes.in_flight == 0


async def test_outcomes_of_a_revoked_partition_never_move_its_offset() -> None:
    gate = Gate()
    lanes = _Lanes(gate.handle)
    lanes.add([record(10, b"a")])
    await settle()
    lanes.forget_unassigned(set())  # the partition was revoked while offset 10 was in flight
    lanes.add([record(5, b"b")])  # reassigned: its new owner had committed only up to 5
    gate.release(10)
    await settle()
    assert lanes.committable() == {}  # 10 finishing must not commit past 5
    gate.release(5)
    await lanes.finish()
    assert lanes.committable() == {TP: 6}


async def test_a_failing_record_is_reported_and_nothing_after_it_is_committed() -> None:
    async def handle(rec: ConsumerRecord[bytes, bytes]) -> Outcome:
        if rec.offset == 1:
            raise RuntimeError("database gone")
        return Outcome.DELIVERED

    lanes = _Lanes(handle)
    lanes.add([record(0, b"a"), record(1, b"a"), record(2, b"a")])
    await lanes.finish()
    assert lanes.committable() == {TP: 1}
    with pytest.raises(RuntimeError, match="database gone"):
        lanes.raise_failure()


async def test_a_full_lane_takes_nothing_more_and_names_the_offset_to_fetch_again() -> None:
    gate = Gate()
    lanes = _Lanes(gate.handle)
    held = lanes.add([record(0, b"a"), record(1, b"a"), record(2, b"b"), record(3, b"a")], lane_limit=2)
    # Lane a is full at offset 3: it and everything after it are left for the next fetch.
    assert held == 3
    assert lanes.in_flight == 3
    assert lanes.longest_lane(TP) == 2
    assert lanes.add([record(3, b"a"), record(4, b"b")], lane_limit=2) == 3  # still full: nothing taken
    assert lanes.in_flight == 3
    await settle()
    gate.release(0)
    await settle()
    assert lanes.longest_lane(TP) == 1
    assert lanes.add([record(3, b"a"), record(4, b"b")], lane_limit=2) is None  # fetched again: taken
    for offset in range(1, 5):
        gate.release(offset)
    await lanes.finish()
    assert lanes.committable() == {TP: 5}  # contiguous: nothing skipped by the rewind
    assert sorted(gate.started) == [0, 1, 2, 3, 4]
    assert lanes.longest_lane(TP) == 0
