"""The pure core: chunking, signing, the registry and option checks. No sockets."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

import serverless
from serverless import _registry
from serverless import _wire as p
from serverless._caller.chunking import chunk_iterable, chunk_sequence, even_bounds


@given(st.integers(0, 5000), st.integers(1, 300))
def test_even_bounds_cover_input_with_sizes_differing_by_at_most_one(
    count: int, parts: int
) -> None:
    bounds = even_bounds(count, parts)
    assert len(bounds) == min(count, parts)
    assert [i for a, b in bounds for i in range(a, b)] == list(range(count))
    sizes = {b - a for a, b in bounds}
    assert not sizes or (max(sizes) - min(sizes) <= 1 and min(sizes) >= 1)


def test_seed_bucket_bug_is_not_copied() -> None:
    # The seed's floor-based bucket size sent 150 requests for 150 items and 100 workers.
    assert len(even_bounds(150, 100)) == 100


@given(st.lists(st.integers(), max_size=500), st.integers(1, 50), st.none() | st.integers(1, 40))
def test_chunk_sequence_collates_back_in_order(
    items: list[int], workers: int, size: int | None
) -> None:
    chunks = list(chunk_sequence(items, workers, size))
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert list(itertools.chain.from_iterable(c.items for c in chunks)) == items
    for _, offset, part in chunks:
        assert items[offset : offset + len(part)] == part
    if size is None:
        assert len(chunks) <= workers
    else:
        assert all(len(c.items) <= size for c in chunks)


def test_chunk_iterable_reads_lazily() -> None:
    consumed = []

    def gen() -> Iterator[int]:
        for i in range(10):
            consumed.append(i)
            yield i

    chunks = chunk_iterable(gen(), 3)
    assert tuple(next(chunks)) == (0, 0, [0, 1, 2])
    assert consumed == [0, 1, 2]
    assert [tuple(c) for c in chunks] == [(1, 3, [3, 4, 5]), (2, 6, [6, 7, 8]), (3, 9, [9])]


def test_signature_roundtrip_and_tamper_detection() -> None:
    ring = p.Keyring("a" * 32)
    body = p.encode(p.Call(v=p.VERSION, fn="m:f", id="x", index=0, items=[1]))
    msg = p.string_to_sign("POST", "/r", "m:f", "1.0", "x", body)
    header = ring.sign(msg)
    assert ring.verify(msg, header) == ring.key_ids[0]  # the key that verified
    assert (
        ring.verify(p.string_to_sign("POST", "/r", "m:f", "1.0", "x", body + b"!"), header) is False
    )
    assert ring.verify(p.string_to_sign("POST", "/other", "m:f", "1.0", "x", body), header) is False
    assert p.Keyring("b" * 32).verify(msg, header) is None  # unknown key id
    assert ring.verify(msg, "") is None
    assert ring.verify(msg, header.replace("=", "=0", 1)) is False


def test_key_rotation_one_signing_key_several_verifying() -> None:
    old, new = "old-secret-0123456789", "new-secret-0123456789"
    msg = b"message"
    rotated = p.Keyring([new, old])
    assert rotated.sign(msg).count("=") == 1  # one signature, with the first key
    assert rotated.sign(msg).startswith(p.key_id(new) + "=")
    assert rotated.verify(msg, p.Keyring(old).sign(msg)) == p.key_id(old)  # old caller
    assert rotated.verify(msg, p.Keyring(new).sign(msg)) == p.key_id(new)  # new caller
    assert p.Keyring(old).verify(msg, rotated.sign(msg)) is None  # hence: workers first
    assert p.Keyring(old).verify(msg, p.Keyring([old, new]).sign(msg)) == p.key_id(old)
    # a worker answers with the key its caller signed with, which the caller holds
    assert p.Keyring(old).verify(msg, rotated.sign(msg, p.key_id(old))) == p.key_id(old)
    assert rotated.key_ids == [p.key_id(new), p.key_id(old)]


def test_weak_or_missing_secret_is_refused() -> None:
    with pytest.raises(serverless.ConfigurationError):
        p.Keyring("short")
    with pytest.raises(serverless.ConfigurationError):
        p.Keyring([])


def test_unencodable_value_is_a_serialization_error() -> None:
    with pytest.raises(serverless.SerializationError) as info:
        p.encode(p.Call(v=p.VERSION, fn="m:f", id="x", index=0, items=[object()]))
    assert isinstance(info.value, TypeError)


def test_registry_names_functions_by_module_and_qualname() -> None:
    from tests import sample_functions as sf

    assert sf.square.entry.name == "tests.sample_functions:square"
    assert _registry.lookup("tests.sample_functions:Geo.scaled") is not None
    assert _registry.lookup("tests.sample_functions:plain") is None
    assert _registry.lookup("os:system") is None


def test_functions_defined_inside_functions_are_refused_at_decoration() -> None:
    with pytest.raises(serverless.ConfigurationError, match="inside a function"):

        @serverless.parallel
        def local(items: list[int]) -> list[int]:
            return items


@pytest.mark.parametrize(
    "options",
    [{"workers": 0}, {"workers": "3"}, {"chunk_size": 0}, {"timeout": -1}, {"retries": -1}],
)
def test_bad_options_are_configuration_errors(options: dict[str, object]) -> None:
    with pytest.raises(serverless.ConfigurationError):
        serverless.parallel(**options)  # type: ignore[call-overload]


def test_exception_tree() -> None:
    assert issubclass(serverless.ConfigurationError, ValueError)
    assert issubclass(serverless.SerializationError, TypeError)
    assert issubclass(serverless.WorkerTimeout, TimeoutError)
    for exc in (serverless.RequestRejected, serverless.WorkerUnavailable, serverless.ProtocolError):
        assert issubclass(exc, serverless.WorkerError)
    assert serverless.WorkerUnavailable.retryable and not serverless.RequestRejected.retryable


def test_all_equals_the_public_names() -> None:
    public = {
        name
        for name, value in vars(serverless).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert set(serverless.__all__) - {"__version__"} == public
    assert len(serverless.__all__) == len(set(serverless.__all__))


def test_secrets_from_env_takes_a_comma_separated_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    from serverless._config import Settings, secrets_from_env

    new, old = "n" * 32, "o" * 32
    monkeypatch.setenv("SERVERLESS_SECRET", f" {new} , {old},")
    assert secrets_from_env() == [new, old]
    ring = Settings().caller_keyring()
    assert ring is not None and ring.key_ids == [p.key_id(new), p.key_id(old)]
    monkeypatch.setenv("SERVERLESS_SECRET", "")
    assert Settings().caller_keyring() is None


def test_with_options_refuses_an_unknown_option_naming_the_valid_ones() -> None:
    from tests import sample_functions as sf

    with pytest.raises(serverless.ConfigurationError) as info:
        sf.square.with_options(worker=8, timout=1)  # type: ignore[call-arg]
    message = str(info.value)
    assert "unknown options timout, worker" in message
    for name in ("workers", "chunk_size", "timeout", "retries", "deadline", "rate", "errors"):
        assert name in message


def test_with_options_none_clears_what_the_decorator_set() -> None:
    step = serverless.parallel(deadline=5.0, url="http://127.0.0.1:9/r")(_double)
    cleared = step.with_options(deadline=None, url=None)
    assert step.options.deadline == 5.0 and cleared.options.deadline is None
    assert cleared.options.url is None and cleared.options.workers == step.options.workers


def test_with_options_none_clears_every_option() -> None:
    # None unsets the options it can unset, and puts the default back for the others; in the
    # decorator, buffer=None and patience=None also unbound the call, as with_options does
    set_all = serverless.parallel(
        workers=3,
        chunk_size=2,
        timeout=5.0,
        retries=0,
        url="http://127.0.0.1:9/r",
        deadline=5.0,
        idempotent=True,
        hedge=True,
        errors="return",
        rate="50/s",
        patience=9.0,
        buffer=1 << 20,
    )(_double)
    cleared = set_all.with_options(**dict.fromkeys(serverless.Options.__dataclass_fields__))
    defaults = serverless.Options()
    assert cleared.options == serverless.Options(
        chunk_size=None, url=None, deadline=None, hedge=None, rate=None, patience=None, buffer=None
    )
    for name in ("workers", "timeout", "retries", "idempotent", "errors"):
        assert getattr(cleared.options, name) == getattr(defaults, name)
    unbounded = serverless.parallel(buffer=None, patience=None)(_double)
    assert unbounded.options.buffer is None and unbounded.options.patience is None
    assert serverless.parallel(_double).options.buffer == defaults.buffer


def _double(items: list[int]) -> list[int]:
    return [2 * n for n in items]
