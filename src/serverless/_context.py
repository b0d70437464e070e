"""The request being served, so a call made while serving it can call back to its own host."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from ._protocol import Keyring


@dataclass(frozen=True)
class Origin:
    """The worker route of the app serving the current request: the seed's call-back-to-self."""

    url: str
    route: str
    keyring: Keyring
    # False when the server runs one request at a time (a single sync WSGI worker): calling
    # back into it from a request would deadlock, so the local pool serves instead.
    concurrent: bool = True


current_origin: ContextVar[Origin | None] = ContextVar("serverless_origin", default=None)
