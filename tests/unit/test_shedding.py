"""The limits on anonymous connections, without sockets: when a body is due, which connection
is shed (tests/integration/test_lockout.py performs the attacks on real servers)."""

from __future__ import annotations

from typing import Any, cast

from serverless._worker import admission
from serverless._worker.admission import body_due
from serverless._worker.uvserver import Connections, GuardedHttpTools


def test_a_body_is_due_when_idle_too_slow_or_too_long() -> None:
    idle, rate, deadline = admission.BODY_IDLE, admission.BODY_MIN_RATE, admission.BODY_DEADLINE
    assert body_due(0.0, 0.0, 0) == idle  # nothing yet: the grace
    assert body_due(0.0, 9.0, 10) == idle + 10 / rate  # a trickle: the rate, not the idle time
    fast = int(rate * deadline * 2)
    assert body_due(0.0, 1.0, fast) == 1.0 + idle  # fast, then silent: the idle timeout
    assert body_due(0.0, deadline - 1, fast) == deadline  # fast, still coming: the deadline


class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class _Conn:
    def __init__(self) -> None:
        self.shed = False
        self.transport = _Transport()


def _conns(n: int) -> list[Any]:
    return [_Conn() for _ in range(n)]


def test_beyond_the_cap_the_longest_idle_or_incomplete_connection_is_shed() -> None:
    connections = Connections()
    connections.cap = 3
    a, b, c, d, e = _conns(5)
    for conn in (a, b, c):
        connections.opened(cast(GuardedHttpTools, conn))
    connections.settle(cast(GuardedHttpTools, a))  # a runs a complete request: never shed
    connections.mark(cast(GuardedHttpTools, b))  # b starts a request: last in line
    connections.opened(cast(GuardedHttpTools, d))
    assert [x.transport.closed for x in (a, b, c, d)] == [False, False, True, False]
    connections.opened(cast(GuardedHttpTools, e))
    assert b.transport.closed and not d.transport.closed and not e.transport.closed
    assert connections.open == 3
    connections.closed(cast(GuardedHttpTools, c))  # a shed connection's close counts once
    assert connections.open == 3


def test_the_newcomer_stays_when_nothing_else_can_be_shed() -> None:
    connections = Connections()
    connections.cap = 1
    a, b = _conns(2)
    connections.opened(cast(GuardedHttpTools, a))
    connections.settle(cast(GuardedHttpTools, a))
    connections.opened(cast(GuardedHttpTools, b))
    assert not a.transport.closed and not b.transport.closed and connections.open == 2
