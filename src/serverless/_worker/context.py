"""The request being served, so a call made while serving it can call back to its own host."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._exceptions import ConfigurationError
from .._wire import Keyring

if TYPE_CHECKING:
    from .endpoint import Endpoint
    from .threads import RequestThreads


@dataclass(frozen=True)
class Origin:
    """The worker route of the app serving the current request: the seed's call-back-to-self."""

    url: str
    route: str
    keyring: Keyring
    # False when the server runs one request at a time (a single sync WSGI worker): calling
    # back into it from a request would deadlock, so the local pool serves instead.
    concurrent: bool = True
    # Why there is no trusted URL (url is then ""): a call that would call back raises it.
    refusal: str = ""
    # The app's own endpoint and its threads: a call made while serving runs chunks of its
    # own fan-out on its thread through it (_caller/sharing.py), and sends to itself at most as
    # many as the server has free threads.
    endpoint: Endpoint | None = None
    threads: RequestThreads | None = None
    chunk: bool = False  # the request is a chunk sent to the route, not one of the app's own

    def checked_url(self) -> str:
        if self.refusal:
            raise ConfigurationError(self.refusal)
        return self.url


current_origin: ContextVar[Origin | None] = ContextVar("serverless_origin", default=None)
