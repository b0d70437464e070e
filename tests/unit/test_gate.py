"""The worker's per-function concurrency gate: narrows for CPU-bound chunks, stays wide for
blocking ones, and hands slots out in order without losing any."""

from __future__ import annotations

import asyncio

from serverless._worker.gate import FLOOR, Gate, Limit


def test_cpu_bound_chunks_narrow_the_limit_step_by_step_to_the_floor() -> None:
    limit = Limit(128)
    concurrent = 50.0
    while concurrent > FLOOR:
        limit.observe(cpu_s=1 / concurrent, wall_s=1.0, concurrent=concurrent)  # GIL-shared
        assert limit.limit == max(FLOOR, int(concurrent) // 2)
        concurrent = limit.limit
    limit.observe(cpu_s=0.5, wall_s=1.0, concurrent=2)
    assert limit.limit == FLOOR


def test_blocking_chunks_keep_or_regain_every_thread() -> None:
    limit = Limit(128)
    limit.observe(cpu_s=0.0001, wall_s=3.0, concurrent=50)  # the seed: waits on the network
    assert limit.limit == 128
    limit.limit = FLOOR
    limit.observe(cpu_s=0.0, wall_s=1.0, concurrent=2)
    assert limit.limit == 128


def test_partly_cpu_bound_chunks_settle_where_one_core_is_busy() -> None:
    limit = Limit(128)
    limit.observe(cpu_s=0.1, wall_s=1.0, concurrent=4)  # 10% CPU each, 4 at once: not saturated
    assert limit.limit == 8  # floor(0.85 / 0.1)


def test_gate_hands_out_slots_in_order_and_survives_cancellation() -> None:
    async def main() -> list[int]:
        gate = Gate(4)
        gate.control.limit = 2
        order: list[int] = []

        async def chunk(n: int) -> None:
            await gate.acquire()
            try:
                order.append(n)
                await asyncio.sleep(0.01)
            finally:
                gate.release()

        tasks = [asyncio.create_task(chunk(n)) for n in range(6)]
        await asyncio.sleep(0)
        assert gate.active == 2
        tasks[3].cancel()  # waiting: must leave the queue without taking a slot
        await asyncio.gather(*tasks, return_exceptions=True)
        assert gate.active == 0
        return order

    assert asyncio.run(asyncio.wait_for(main(), 10)) == [0, 1, 2, 4, 5]


def test_average_concurrency_is_integrated_over_time() -> None:
    async def main() -> float:
        gate = Gate(8)
        await gate.acquire()
        start = gate.area()
        await gate.acquire()
        await asyncio.sleep(0.05)
        gate.release()
        gate.release()
        return gate.area() - start

    area = asyncio.run(main())
    assert 0.1 <= area < 0.5  # two active for at least 50 ms
