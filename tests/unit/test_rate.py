"""Issue 17: rate=, serverless.Throttled and the AIMD rate. The downstream is a token bucket in
this process (tests/quota.py) that counts, per item, the calls it served and refused."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import pytest

import serverless
from serverless import ConfigurationError, DeadlineExceeded, RemoteError, Throttled
from serverless._caller.rate import Pacer
from serverless._config import parse_rate
from tests import sample_functions as sf
from tests.quota import DOWNSTREAM


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (50, 50.0),
        (2.5, 2.5),
        ("50/s", 50.0),
        ("50", 50.0),
        ("3000/min", 50.0),
        ("3000 / minute", 50.0),
        ("7200/h", 2.0),
        ("10/sec", 10.0),
        ("auto", "auto"),
        (None, None),
    ],
)
def test_rate_forms(value: object, expected: object) -> None:
    assert parse_rate(value) == expected


@pytest.mark.parametrize("value", [0, -1, "0/s", "fast", "5/day", True, float("inf"), "nan/s", []])
def test_bad_rates_are_refused_with_the_forms_named(value: object) -> None:
    with pytest.raises(ConfigurationError, match="rate must"):
        serverless.parallel(rate=value)(lambda items: items)  # type: ignore[call-overload]


def test_with_options_takes_a_rate() -> None:
    assert sf.quota_lookup.with_options(rate="600/min").options.items_per_s == 10.0


def test_throttled_reads_a_retry_after_header() -> None:
    assert Throttled(retry_after="3").retry_after == 3.0
    assert Throttled(retry_after=0.25).retry_after == 0.25
    assert Throttled(retry_after="Wed, 21 Oct 2026 07:28:00 GMT").retry_after is None
    assert Throttled(retry_after=-1).retry_after is None
    assert isinstance(Throttled(), serverless.ServerlessError)


def test_the_pacer_holds_its_rate_on_a_fake_clock() -> None:
    """Chunks of 1-5 items taken back to back at 100 items/s: the fake clock ends at
    items / rate, within 1%, over a run of 50 simulated seconds."""
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    pacer = Pacer(100.0, clock=lambda: now[0], sleep=sleep)
    rng = random.Random(7)
    sizes = [rng.randint(1, 5) for _ in range(1700)]
    starts = []

    async def run() -> None:
        for size in sizes:
            await pacer.take(size)
            starts.append((now[0], size))

    asyncio.run(run())
    total = sum(sizes)
    assert total / 100 * 0.99 <= now[0] + sizes[-1] / 100 <= total / 100 * 1.01
    # and in every 5 s window, the rate is within 5% of 100/s
    for begin in range(0, int(now[0]) - 5, 5):
        items = sum(n for t, n in starts if begin <= t < begin + 5)
        assert 475 <= items <= 525, (begin, items)


def test_throttles_back_off_once_per_episode_slow_start_then_aimd() -> None:
    now = [0.0]
    pacer = Pacer(None, clock=lambda: now[0])
    for _ in range(10):
        now[0] += 0.1
        pacer.succeeded(20)  # 200 items in the last second
    assert pacer.rate is None and pacer.pace() is None  # unpaced until a throttle
    pacer.throttled(0)
    assert pacer.rate == pytest.approx(160.0)  # 0.8 x what it achieved
    pacer.throttled(0)  # sent before the decrease: the same episode, no second decrease
    assert pacer.rate == pytest.approx(160.0) and pacer.throttles == 2
    assert pacer.pace() == pytest.approx(1 / 160)
    now[0] += 0.1  # a tenth of a second: slow start doubled it
    pacer._refill(now[0])
    assert pacer.rate == pytest.approx(320.0)
    pacer.throttled(1)  # the second episode: down to what got through (under 0.8 x 320)
    assert pacer.rate == pytest.approx(200.0)
    for _ in range(20):  # two seconds of deliveries: +8% of 250 per second
        now[0] += 0.1
        pacer.succeeded(20)
    pacer._refill(now[0])
    assert pacer.rate == pytest.approx(200.0 + 2 * 20.0)
    now[0] += 5.0  # nothing delivered for a while (a Retry-After): no growth past 2 x that
    pacer._refill(now[0])
    assert pacer.rate == pytest.approx(240.0)


def test_a_users_rate_is_a_ceiling() -> None:
    now = [0.0]
    pacer = Pacer(50.0, clock=lambda: now[0])
    assert pacer.itemwise and pacer.pace() == pytest.approx(0.02)
    now[0] += 1.0
    pacer.succeeded(500)
    pacer.throttled(0)
    assert pacer.rate == pytest.approx(40.0)
    now[0] += 100.0
    pacer.succeeded(100)
    pacer._refill(now[0])
    assert pacer.rate == 50.0


def test_a_throttle_resends_only_the_refused_items() -> None:
    """rate="auto": item by item from the start, so each item is served exactly once; the
    refused calls are exactly the call's throttles; none counts as a retry."""
    DOWNSTREAM.reset(rate=400.0, burst=20.0)
    f = sf.quota_lookup.with_options(rate="auto", retries=0, workers=20)
    out, stats = f.with_stats(list(range(400)))
    assert out == [2 * n for n in range(400)]
    assert DOWNSTREAM.served == dict.fromkeys(range(400), 1)
    assert sum(DOWNSTREAM.refused.values()) == stats.throttles > 0
    assert stats.retries == 0 and stats.rate is not None
    assert sum(c.throttles for c in stats.chunks) == stats.throttles


def test_without_a_rate_a_throttle_switches_the_call_to_item_by_item() -> None:
    """No rate=: the chunk that is throttled first goes again whole (its results were lost
    with the exception); from then on the call runs item by item, paced."""
    DOWNSTREAM.reset(rate=300.0, burst=5.0)
    out, stats = sf.quota_lookup.with_options(chunk_size=10, workers=8).with_stats(list(range(200)))
    assert out == [2 * n for n in range(200)]
    assert stats.throttles >= 1 and stats.rate is not None
    assert set(DOWNSTREAM.served) == set(range(200))
    assert sum(DOWNSTREAM.served.values()) <= 200 + 8 * 9  # a rerun of at most 9 per chunk


def test_a_paced_call_holds_its_rate() -> None:
    """rate=100 on 150 items: the downstream sees them over 1.5 s, never refusing one, in
    any 0.5 s window at most 10% over the rate."""
    DOWNSTREAM.reset(rate=1000.0, burst=1000.0)
    started = time.monotonic()
    out, stats = sf.quota_lookup.with_options(rate=100).with_stats(list(range(150)))
    elapsed = time.monotonic() - started
    assert out == [2 * n for n in range(150)]
    assert elapsed >= 1.4 and stats.throttles == 0 and stats.rate == 100.0
    times = sorted(DOWNSTREAM.times)
    for t in times:
        assert sum(1 for u in times if t <= u < t + 0.5) <= 55
    assert stats.items_per_s <= 110


def test_retry_after_is_honoured() -> None:
    """The downstream refuses everything for 0.6 s and says so: the refused items wait for
    it (no call comes in between), and every item is served once."""
    DOWNSTREAM.reset(rate=1000.0, burst=1000.0)
    started = time.monotonic()
    DOWNSTREAM.closed_until = started + 0.6
    out = sf.quota_lookup.with_options(rate="auto", workers=1, chunk_size=8)(list(range(8)))
    assert out == [2 * n for n in range(8)] and time.monotonic() - started >= 0.6
    assert DOWNSTREAM.served == dict.fromkeys(range(8), 1)
    assert len(DOWNSTREAM.refusals) == 1  # one refused call, then the wait it asked for


def test_the_deadline_bounds_a_call_that_is_always_throttled() -> None:
    f = sf.quota_lookup.with_options(deadline=1.0)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        f(list(range(10)), True)
    assert time.monotonic() - started < 3.0


def test_errors_return_keeps_each_items_error_and_resends_throttled_ones() -> None:
    DOWNSTREAM.reset(rate=500.0, burst=3.0)
    f = sf.counted_or_throttled.with_options(errors="return", chunk_size=10)
    out = f(list(range(60)))
    for n, value in enumerate(out):
        if n % 7 == 3:
            assert isinstance(value, RemoteError) and value.index == n
        else:
            assert value == n
    assert DOWNSTREAM.served == dict.fromkeys(range(60), 1)


def test_a_throttled_fused_pipeline_goes_on_one_item_per_request_at_the_quota() -> None:
    """A fused call runs its stages on whole chunks: the chunk that is throttled goes again
    whole (the first stage's results were lost with the exception); from then on the plan
    sends one item per request on the token clock, so the call finds the quota instead of
    resending whole chunks (before: 28.5 s for these 100 items against 300/s, the rate ending
    at 8.7/s, 211 downstream calls)."""
    DOWNSTREAM.reset(rate=300.0, burst=5.0)
    first = sf.quota_lookup.with_options(chunk_size=10, workers=8)
    pipeline = serverless.Pipeline(first, sf.square.with_options(chunk_size=10, workers=8))
    run = pipeline.execute(list(range(100)))
    assert run.result == [(2 * n) ** 2 for n in range(100)]
    assert run.steps[1].fused_with == 1 and run.steps[0].throttles > 0
    assert set(DOWNSTREAM.served) == set(range(100))
    calls = sum(DOWNSTREAM.served.values()) + sum(DOWNSTREAM.refused.values())
    assert calls <= 2 * 100  # a rerun only for what a whole chunk's throttle lost
    assert run.steps[0].rate is not None and run.steps[0].rate > 100  # near the quota
    # the stage figures add up over a chunk's one-item requests
    assert [s.count for s in run.steps] == [100, 100]
    assert [s.count_out for s in run.steps] == [100, 100]


def test_a_chunk_sent_in_parts_spans_all_of_them_in_its_timings() -> None:
    DOWNSTREAM.reset(rate=1000.0, burst=1000.0)
    out, stats = sf.quota_lookup.with_options(workers=1, chunk_size=20, rate=20).with_stats(
        list(range(20))
    )
    assert out == [2 * n for n in range(20)]
    (chunk,) = stats.chunks
    assert chunk.start < 0.1 and chunk.end > 0.8 and chunk.size == 20 and chunk.attempts == 1


# -- issue 22: a call against a downstream that always refuses ends, and never floods it ------


@pytest.mark.parametrize("rate", [None, "auto", 50], ids=["unpaced", "auto", "rate=50"])
def test_a_downstream_that_refuses_everything_ends_the_call_and_is_not_flooded(
    rate: float | str | None,
) -> None:
    """Every item refused with no Retry-After: the call raises StillThrottled once its
    patience is spent, naming the last refusal and what completed, and the downstream sees a
    first wave and then a trickle (before: 2,900 requests/s with no rate=, and no end; the
    deadline here only keeps the old code from hanging)."""
    DOWNSTREAM.reset(rate=1.0, burst=1.0)
    f = sf.spent_quota.with_options(rate=rate, patience=3, deadline=20)
    started = time.monotonic()
    with pytest.raises(serverless.StillThrottled) as info:
        f(list(range(200)))
    elapsed = time.monotonic() - started
    assert 3.0 <= elapsed < 6.0, elapsed
    error = info.value
    assert isinstance(error, Throttled)
    assert error.completed == 0 and error.last == "429: daily quota exceeded"
    assert "daily quota exceeded" in str(error) and "patience" in str(error)
    refusals = sorted(t - started for t in DOWNSTREAM.refusals)
    assert 0 < error.throttles <= len(refusals)  # one may be answered as the call ends
    first_wave = sum(1 for t in refusals if t < 0.5)
    assert first_wave <= 100 + 1  # one per chunk in flight (workers=100), then one more
    # then a trickle: at most START items/s and pauses that double, never a flood
    later = [t for t in refusals if t >= 0.5]
    assert len(later) <= 3 * 2 + 2, later


def test_patience_none_waits_until_the_deadline() -> None:
    DOWNSTREAM.reset(rate=1.0, burst=1.0)
    f = sf.spent_quota.with_options(patience=None, deadline=1.5)
    with pytest.raises(DeadlineExceeded):
        f(list(range(10)))


def test_patience_counts_only_while_nothing_completes() -> None:
    """A quota that lets 5 items through per second: the call is refused most of the time
    but keeps completing items, so a patience shorter than the call never ends it."""
    DOWNSTREAM.reset(rate=40.0, burst=2.0)
    f = sf.quota_lookup.with_options(patience=0.5, chunk_size=5, workers=4)
    out = f(list(range(60)))
    assert out == [2 * n for n in range(60)]


def test_patience_is_an_option() -> None:
    assert sf.spent_quota.with_options(patience=5).options.patience == 5
    assert sf.spent_quota.with_options(patience=None).options.patience is None
    assert serverless.Options().patience == 180.0
    with pytest.raises(ConfigurationError, match="patience"):
        sf.spent_quota.with_options(patience=0)
    assert sf.waits_forever.options.patience is None  # @parallel(patience=None)


def test_consecutive_refusals_pause_longer_each_time_then_one_item_per_second() -> None:
    """On a fake clock: nothing ever gets through. The first throttle paces an unpaced call
    at START (1/s) at once; each further episode pauses the call twice as long (jittered,
    capped); after REFUSED_SLOW seconds, at most one item starts per second; a success
    ends it all."""
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    pacer = Pacer(None, clock=lambda: now[0], sleep=sleep)
    starts: list[float] = []

    async def run() -> None:
        for _ in range(40):
            await pacer.take(1)
            starts.append(now[0])
            pacer.throttled(pacer.sent())
            pacer.answered(pacer.epoch - 1)

    asyncio.run(run())
    assert pacer.rate == 1.0 and pacer.stalled() > 0 and pacer.completed == 0
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= 1.0 - 1e-9 for gap in gaps[1:]), gaps  # never faster than START
    assert max(gaps) > 4.0 and max(gaps) <= 10.0 + 1e-9  # the pause doubled up to its cap
    after = [t for t in starts if t >= 10.0]
    for t in after:
        assert sum(1 for u in after if t <= u < t + 1.0) <= 1
    pacer.succeeded(1)
    assert pacer.stalled() == 0.0 and pacer.completed == 1


# -- issue 22: retries=0 is at most once under throttling too ----------------------------------


def test_retries_0_never_reruns_an_item_that_reached_the_downstream() -> None:
    """No rate=: a whole chunk that the function leaves with Throttled lost the results of
    the items before the refused one, and resending it from item 0 ran them again (5 of 40
    did). retries=0 runs item by item from the first request: counted on the downstream,
    which the worker calls, every item is served exactly once."""
    DOWNSTREAM.reset(rate=200.0, burst=5.0)
    f = sf.quota_lookup.with_options(retries=0, chunk_size=10, workers=4)
    out, stats = f.with_stats(list(range(40)))
    assert out == [2 * n for n in range(40)]
    assert stats.throttles > 0  # the quota did refuse some
    assert DOWNSTREAM.served == dict.fromkeys(range(40), 1)


def test_retries_0_in_a_fused_pipeline_never_reruns_an_item() -> None:
    DOWNSTREAM.reset(rate=200.0, burst=5.0)
    first = sf.quota_lookup.with_options(retries=0, chunk_size=10, workers=4)
    pipeline = serverless.Pipeline(first, sf.square.with_options(chunk_size=10, workers=4))
    run = pipeline.execute(list(range(40)))
    assert run.result == [(2 * n) ** 2 for n in range(40)]
    assert run.steps[1].fused_with == 1 and run.steps[0].throttles > 0
    assert DOWNSTREAM.served == dict.fromkeys(range(40), 1)
