"""The container count of a JSON body (issue 22.12): exact outside strings, whatever the
strings hold (brackets, quotes, backslashes), across the windows it is counted in."""

from __future__ import annotations

import json
import random
from typing import Any

from serverless._wire.bounds import _json_containers

PIECES = ["[", "]", "{", "}", '"', "\\", "\\\\", '\\"', "a", "é", ","]


def _value(rng: random.Random, depth: int) -> tuple[Any, int]:
    """A random value and how many lists and maps it holds."""
    kind = rng.randrange(4) if depth < 4 else 3
    if kind == 0:
        pairs = [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
        return [v for v, _ in pairs], 1 + sum(n for _, n in pairs)
    if kind == 1:
        pairs = [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
        return {str(i) + rng.choice(PIECES): v for i, (v, _) in enumerate(pairs)}, 1 + sum(
            n for _, n in pairs
        )
    if kind == 2:
        return rng.randrange(1000), 0
    return "".join(rng.choice(PIECES) for _ in range(rng.randrange(8))), 0


def test_the_count_is_exact_for_any_strings_in_any_window() -> None:
    rng = random.Random(5)
    for _ in range(300):
        value, containers = _value(rng, 0)
        body = json.dumps(value, ensure_ascii=rng.random() < 0.5).encode()
        for window in (1, 2, 3, 7, 1 << 20):
            assert _json_containers(body, 10**9, window) == containers, (body, window)
