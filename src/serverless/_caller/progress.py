"""progress=: a live bar on the terminal (tqdm), or the user's own callable.

tqdm, not rich: it is one small pure-Python package with no dependencies of its own, it
draws from any thread and falls back to plain lines where the terminal cannot redraw, and it
already computes items/s and the ETA from the counts it is given (rich's progress needs its
own live-display thread and brings pygments and markdown-it along). It is imported only when
a call asks for a bar. `progress=True` draws nothing where stderr is not a terminal (a
pipe, a log file, CI): pass "always" for lines there too. A Pipeline draws one bar per step,
one below the other as the steps run.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

from .._stats import Progress

Report = Callable[[Progress], None]


def reporter(progress: Any) -> Report | None:
    """What receives a call's Progress events for its `progress=` option (None: nothing)."""
    if progress is None or progress is False:
        return None
    if callable(progress):
        return progress  # type: ignore[no-any-return]
    if progress is True and not _terminal():
        return None
    return Bar()


class Bar:
    """One tqdm bar per step, opened at the step's first event and closed at its last."""

    def __init__(self) -> None:
        self._bar: Any = None

    def __call__(self, event: Progress) -> None:
        bar = self._bar
        if bar is None:
            from tqdm import tqdm

            label = event.step
            if event.steps > 1:  # fused steps share a line, named "a+b": "1-2/3 a+b"
                last = event.step_number + event.step.count("+")
                span = f"{event.step_number}-{last}" if last > event.step_number else str(last)
                label = f"{span}/{event.steps} {event.step}"
            bar = self._bar = tqdm(
                total=event.total,
                desc=label,
                unit="item",
                file=sys.stderr,
                **_shape(),
                mininterval=0.1,
                leave=True,
            )
        if event.total != bar.total:
            bar.total = event.total
        bar.set_postfix_str(_figures(event), refresh=False)
        if event.done != bar.n:
            bar.update(event.done - bar.n)  # tqdm redraws at most every 0.1 s
        else:
            bar.refresh()  # the figures beside it changed, or only the time
        if event.finished:
            bar.close()
            self._bar = None


def _figures(event: Progress) -> str:
    """What the bar shows beside tqdm's count, rate and ETA."""
    parts = [f"failed {event.failed}"] if event.failed else []
    if event.cached:
        parts.append(f"stored {event.cached}")
    parts.append(f"retries {event.retries}")
    if event.busy:
        parts.append(f"busy {event.busy}")
    if event.hedges:
        parts.append(f"hedges {event.hedges}")
    parts.append(f"throttles {event.throttles}")
    if not event.finished:
        parts.append(f"in flight {event.in_flight}/{event.window}")
    return ", ".join(parts)


def _shape() -> dict[str, Any]:
    """How big the bar is drawn: following the terminal where it tells its size; else $COLUMNS
    and $LINES or 100 x 24 (a terminal that says 0 x 0, as a bare pseudo-terminal does,
    would get a bar of no width, and tqdm hides a bar below the screen's last line)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
        if size.columns > 0 and size.lines > 0:
            return {"dynamic_ncols": True}
    except (AttributeError, ValueError, OSError):
        pass
    columns, lines = shutil.get_terminal_size((100, 24))
    return {"ncols": columns or 100, "nrows": lines or 24}


def _terminal() -> bool:
    """Whether a bar can be drawn where the user looks: a terminal, or a Jupyter kernel."""
    stream = sys.stderr
    try:
        if stream is not None and stream.isatty():
            return True
    except (AttributeError, ValueError):  # a replaced or closed stderr
        return False
    return "ipykernel" in sys.modules
