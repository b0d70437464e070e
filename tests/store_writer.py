"""A process that writes a result store: `python -m tests.store_writer SPEC WRITER BATCHES SIZE`.

Batch b of writer w holds SIZE records keyed by record_key(w, b, j), each payload naming its
key and of varied length; BATCHES 0 writes until killed. It prints "ready" once it has opened
the store, and "done" at the end.
"""

from __future__ import annotations

import hashlib
import sys

from serverless._caller.store import open_store


def record_key(writer: int, batch: int, j: int) -> bytes:
    return hashlib.sha256(f"{writer}.{batch}.{j}".encode()).digest()


def payload(writer: int, batch: int, j: int) -> bytes:
    name = f"{writer}.{batch}.{j}:".encode()
    return name + bytes([j % 251]) * (100 + (batch * 37 + j * 101) % 4000)


def batch_records(writer: int, batch: int, size: int) -> list[tuple[bytes, bytes]]:
    return [(record_key(writer, batch, j), payload(writer, batch, j)) for j in range(size)]


def main() -> None:
    spec, writer, batches, size = sys.argv[1], *map(int, sys.argv[2:5])
    store = open_store(spec)
    print("ready", flush=True)
    batch = 0
    while batches == 0 or batch < batches:
        store.put_many(batch_records(writer, batch, size))
        batch += 1
    store.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
