"""Importing this module leaves a mark: a worker must never import a module named on the wire.

The mark is a file named by $SERVERLESS_TEST_CANARY, or one named after the importing
process's parent (the test process, for a local pool worker).
"""

from __future__ import annotations

import os
import tempfile


def canary_path(parent: int) -> str:
    return os.path.join(tempfile.gettempdir(), f"serverless-import-canary-{parent}")


with open(os.environ.get("SERVERLESS_TEST_CANARY") or canary_path(os.getppid()), "a") as f:
    f.write(f"imported by {os.getpid()}\n")


def anything(numbers: list[int]) -> list[int]:
    return numbers
