"""How many lists and maps an envelope would decode into, counted before decoding it.

An empty array is one byte of MessagePack (two of JSON) and about 80 bytes of Python: a 4 MiB
body of them grew a worker by 322 MB (issue 14). Other values grow at most ~30 times, which
max_body bounds. The count is cheap for ordinary bodies: an upper bound from the bytes that
can open a container (C speed); only a body with more such bytes than the limit is walked
element by element, and the walk stops at the limit.
"""

from __future__ import annotations

MAX_CONTAINERS = 1_000_000  # ~80 MB of empty lists at most

_MSGPACK_OPENERS = bytes([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
_NOT_MSGPACK_OPENERS = bytes(b for b in range(256) if b not in _MSGPACK_OPENERS)

# MessagePack: the bytes after an element's first byte, by first byte (payload lengths that
# the element itself announces are added by the walk).
_FIXED = {0xC0: 0, 0xC2: 0, 0xC3: 0, 0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}
_FIXED.update({0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8})
_FIXED.update({0xD4: 2, 0xD5: 3, 0xD6: 5, 0xD7: 9, 0xD8: 17})  # fixext: type byte + data
_SIZED = {0xC4: (1, 0), 0xC5: (2, 0), 0xC6: (4, 0), 0xD9: (1, 0), 0xDA: (2, 0), 0xDB: (4, 0)}
_SIZED.update({0xC7: (1, 1), 0xC8: (2, 1), 0xC9: (4, 1)})  # ext: length, then a type byte
_CONTAINER_LENGTH = {0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}


def too_many_containers(body: bytes, json: bool, limit: int = MAX_CONTAINERS) -> bool:
    """True if decoding `body` would build more than `limit` lists and maps."""
    if json:
        if body.count(b"[") + body.count(b"{") <= limit:
            return False
        return _json_containers(body, limit) > limit
    if len(body.translate(None, _NOT_MSGPACK_OPENERS)) <= limit:
        return False
    return _msgpack_containers(body, limit) > limit


def _json_containers(body: bytes, limit: int, window: int = 1 << 20) -> int:
    """The brackets and braces outside strings, counted a window at a time with C-speed
    bytes methods: escapes go first (a backslash pair, then an escaped quote), so that every
    quote left opens or closes a string. A regex over the whole body took 1.7 s in one call
    on 8 M strings of "[", holding the GIL (the event loop) throughout."""
    bare = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    count, inside = 0, False
    for start in range(0, len(bare), window):
        pieces = bare[start : start + window].split(b'"')
        outside = b"".join(pieces[1 if inside else 0 :: 2])
        count += outside.count(b"[") + outside.count(b"{")
        inside ^= (len(pieces) - 1) % 2 == 1
        if count > limit:
            break
    return count


def _msgpack_containers(body: bytes, limit: int) -> int:
    """Walk the elements (nesting does not matter: they follow one another); stop past
    `limit` or at anything malformed, which the decoder then refuses."""
    count, pos, end = 0, 0, len(body)
    fixed, sized, lengths = _FIXED, _SIZED, _CONTAINER_LENGTH
    while pos < end and count <= limit:
        first = body[pos]
        pos += 1
        if first < 0x80 or first >= 0xE0:
            continue
        if first < 0xA0 or first in lengths:
            count += 1
            pos += lengths.get(first, 0)
        elif first < 0xC0:
            pos += first & 0x1F
        elif first in fixed:
            pos += fixed[first]
        elif first in sized:
            width, extra = sized[first]
            pos += width + extra + int.from_bytes(body[pos : pos + width], "big")
        else:
            break  # 0xC1, never used
    return count
