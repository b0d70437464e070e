"""Functions of `__main__` run on the local pool by value: the caller pickles them, a pool
worker unpickles them, after its signature check, from the pool's private directory.

A function of the script being run, a notebook cell, the REPL, `python -c` or a script read
from stdin lives in no module a worker could import. Its workers used to import the caller's
main script instead, which ran an unguarded script's top-level work again in every worker, and
could not work at all without a script file. Now the caller pickles the call's `__main__`
functions with cloudpickle at every call (with what they reference in `__main__`: helpers,
globals, the class of a method), so a redefined cell or a changed global takes effect on the
next call, and stores the pickle in the pool's 0700 directory under its SHA-256; the signed
request names that digest (`Call.code`, docs/protocol.md). A pool worker checks the request's
signature, opens the file without following links, checks it is this user's regular file whose
SHA-256 is the signed digest, and only then unpickles it (cached by digest). The secret lives
in the caller's memory and its workers', the directory and the sockets are this user's alone
(docs/security.md): nothing another user controls reaches the unpickler. A remote worker is
never sent code: such a call is refused in the caller (_targets.py), and a worker that has no
shelf refuses a request that names a digest (_worker/endpoint.py).

cloudpickle is an optional extra (`simple-serverless[local]`), imported only when a function
of `__main__` is called.
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import hashlib
import logging
import os
import pickle
import re
import secrets
import stat
import sys
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import _registry
from .._exceptions import ConfigurationError

logger = logging.getLogger("serverless.pool")

WARN_BYTES = 10 * 1024 * 1024  # a pickle this large warns once per function
MAX_BYTES = 100 * 1024 * 1024  # and this large is refused
DIGEST = re.compile(r"[0-9a-f]{64}")
SUFFIX = ".pickle"
KEEP_FILES = 256  # pickles a writer keeps in the directory (the least recently sent go)
KEEP_BYTES = 512 * 1024 * 1024
CACHED = 64  # unpickled payloads a worker keeps, by digest
INSTALL = "pip install 'simple-serverless[local]'"

# what one function of a call travels as: its name, the undecorated function, how it was
# declared ("plain", "static", "class") and the class it was defined in (None: none)
Sent = tuple[str | None, Callable[..., Any], str, type | None]

_warned: set[str] = set()


def is_main(entry: _registry.Entry) -> bool:
    """Whether the function lives in `__main__`, which no worker imports: it goes by value."""
    return entry.module == "__main__"


def is_main_name(func: Callable[..., Any]) -> bool:
    """Whether `func` was defined in `__main__`."""
    return _registry.module_name(getattr(func, "__module__", "") or "") == "__main__"


def require(name: str) -> None:
    """Raise ConfigurationError, naming the cause and the fix, if cloudpickle is missing."""
    try:
        import cloudpickle  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            f"{name} is defined {where_defined()}: the local pool runs such a function by "
            "sending it to its workers by value, with cloudpickle, which is not installed. "
            f"Install it (`{INSTALL}`), or put the function in a module and import it "
            f"(`from mysteps import {name.rpartition('.')[2]}`)."
        ) from None


def dumps(functions: Sequence[tuple[str, Sent]]) -> bytes:
    """One call's functions of `__main__` pickled together, with what they reference in
    `__main__`; ConfigurationError if cloudpickle is missing, if something they reference
    cannot be pickled, or if the pickle is over MAX_BYTES."""
    first = functions[0][0].partition(":")[2]
    require(first)
    import cloudpickle

    try:
        data: bytes = cloudpickle.dumps([sent for _, sent in functions], protocol=5)
    except Exception as exc:
        raise ConfigurationError(
            f"{first} cannot be sent to the local pool's workers by value: pickling it (with "
            f"the globals, helpers and classes it uses) failed: {type(exc).__name__}: {exc}. "
            "Put the function in a module and import it, or stop it referencing that object."
        ) from exc
    size = len(data)
    if size > MAX_BYTES:
        raise ConfigurationError(
            f"{first} pickles to {size / 2**20:.1f} MiB with what it references in __main__, "
            f"over the {MAX_BYTES // 2**20} MiB the local pool accepts by value. Put the "
            "function in a module and import it, and pass large data as items or arguments "
            "(or load it on the workers) instead of through a global."
        )
    if size > WARN_BYTES and first not in _warned:  # once per function and process
        _warned.add(first)
        warnings.warn(  # a UserWarning: Python shows it by default, a notebook too
            f"{first} pickles to {size / 2**20:.1f} MiB with what it references in __main__ "
            "(its globals travel with it, at every call that changes them): put the function "
            "in a module, or pass large data as items or arguments",
            UserWarning,
            stacklevel=5,
        )
    return data


class Shelf:
    """The pickles of one local pool, in its private (0700) directory, named by SHA-256.

    The caller writes each new pickle once (a fresh file of a random name, O_EXCL|O_NOFOLLOW,
    mode 0600, renamed into place) and keeps the last KEEP_FILES it sent; a worker reads one
    only through `load`, which checks it before unpickling."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._written: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._bytes = 0
        self._loaded: collections.OrderedDict[str, Mapping[str, _registry.Entry]] = (
            collections.OrderedDict()
        )

    def path(self, digest: str) -> Path:
        return self.directory / f"{digest}{SUFFIX}"

    # -- the caller's side -------------------------------------------------------------------

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            if digest in self._written:
                self._written.move_to_end(digest)
                return digest
            partial = self.directory / f".{digest[:16]}.{secrets.token_hex(8)}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
            fd = os.open(partial, flags, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(partial, self.path(digest))  # a link planted there is replaced
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(partial)
                raise
            self._written[digest] = len(data)
            self._bytes += len(data)
            while len(self._written) > KEEP_FILES or (
                self._bytes > KEEP_BYTES and len(self._written) > 1
            ):
                old, size = self._written.popitem(last=False)
                self._bytes -= size
                with contextlib.suppress(OSError):
                    self.path(old).unlink()
        return digest

    # -- a worker's side ---------------------------------------------------------------------

    def load(self, digest: str) -> Mapping[str, _registry.Entry] | str:
        if DIGEST.fullmatch(digest) is None:
            return "the code digest must be 64 lower-case hex digits"
        with self._lock:
            cached = self._loaded.get(digest)
            if cached is not None:
                self._loaded.move_to_end(digest)
                return cached
        data = self._read(digest)
        if isinstance(data, str):
            return data
        # the file is this user's, in this pool's private directory, and is the very pickle
        # the signed request names: only now is it unpickled
        try:
            sent: list[Sent] = pickle.loads(data)
            entries = {}
            for name, func, declared, cls in sent:
                entry = _registry.detached(func, name, declared, cls)
                entries[entry.name] = entry
        except Exception as exc:
            logger.exception("cannot unpickle the functions sent by value (%s)", digest)
            return f"the functions sent by value cannot be unpickled here: {exc!r}"
        with self._lock:
            self._loaded[digest] = entries
            while len(self._loaded) > CACHED:
                self._loaded.popitem(last=False)
        return entries

    def _read(self, digest: str) -> bytes | str:
        """The file's bytes if it is this user's regular file whose SHA-256 is `digest`."""
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return "the code sent by value is not in the pool's directory (removed?)"
        except OSError as exc:  # ELOOP: a symbolic link, never followed
            return f"the code sent by value cannot be opened: {exc.strerror}"
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_uid != _uid():
                return "the code sent by value is not this user's regular file: refused"
            if info.st_size > MAX_BYTES:
                return "the code sent by value is too large: refused"
            data = f.read(MAX_BYTES + 1)
        if hashlib.sha256(data).hexdigest() != digest:
            logger.error("the pickle %s does not match its signed digest: not unpickled", digest)
            return "the code sent by value does not match its signed digest: refused, unread"
        return data


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


def where_defined() -> str:
    """Where the functions of `__main__` of this process come from, for error messages."""
    if hasattr(builtins, "__IPYTHON__"):
        return "in a notebook or IPython session"
    if hasattr(sys, "ps1"):
        return "in an interactive session"
    argv0 = sys.argv[0] if sys.argv else ""
    if argv0 == "-c":
        return "in a `python -c` command"
    if argv0 in ("-", ""):
        return "in a script read from standard input"
    return "in the script being run (__main__)"


def remote_refusal(entry: _registry.Entry, target: str) -> ConfigurationError:
    """The error for a function of `__main__` called with a remote target: no code is ever
    sent to a remote worker (docs/security.md)."""
    name = entry.name.partition(":")[2] or entry.qualname  # a named lambda's name, not <lambda>
    short = name.partition(".")[0]  # what to import: the function, or its class
    return ConfigurationError(
        f"{name} is defined {where_defined()}, and {target} cannot run it: a remote worker "
        "runs only functions it imports itself, never code sent to it (only the local pool "
        "gets such a function, by value). Put it in a module that both this code and the "
        f"workers import (`from mysteps import {short}`, and `serverless worker mysteps` or "
        "your app's own import)."
    )
