"""Wire protocol v3, its signatures: key ids, the strings each side signs (the request's over
its headers and the body's SHA-256, the reply's bound to its request id), and the Keyring
that signs and checks them (HMAC-SHA256, several keys during a rotation). Pure: the time a
request is signed at is an argument.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from .._exceptions import (
    ConfigurationError,
)
from .envelope import MSGPACK, VERSION


def key_id(secret: str) -> str:
    """A public fingerprint of a secret, so a worker knows which key a signature uses."""
    return hashlib.sha256(b"serverless-key-id:" + secret.encode()).hexdigest()[:12]


def string_to_sign(
    method: str, path: str, function: str, timestamp: str, request_id: str, body: bytes
) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return signing_message(method, path, function, timestamp, request_id, digest)


def signing_message(
    method: str, path: str, function: str, timestamp: str, request_id: str, digest: str
) -> bytes:
    """string_to_sign for a body already hashed (the worker hashes it as it arrives)."""
    fields = (f"v{VERSION}", method.upper(), path, function, timestamp, request_id, digest)
    return "\n".join(fields).encode()


def reply_signing_message(status: int, request_id: str, body: bytes) -> bytes:
    """What a worker signs in its answer: the status, the request it answers, the body. A
    reply cannot be forged, nor moved to another request, nor changed in transit."""
    fields = (f"reply-v{VERSION}", str(status), request_id, hashlib.sha256(body).hexdigest())
    return "\n".join(fields).encode()


def _hmac(key: bytes, message: bytes) -> str:
    """HMAC-SHA256 as lower-case hex. hmac.digest is OpenSSL's one-shot: ~1 us, against ~5 us
    for hmac.new(...).hexdigest(), and a round trip signs and checks four times."""
    return hmac.digest(key, message, "sha256").hex()


class Keyring:
    """Secrets known to this process: the first signs, all verify.

    One signing key at a time, so that once every caller has moved to a new key the old one
    is out of circulation and can be revoked; several verifying keys, so that a rotation is
    rolled out without refusing anything (docs/deploy.md)."""

    def __init__(self, secrets_: str | Sequence[str]) -> None:
        items = [secrets_] if isinstance(secrets_, str) else list(secrets_)
        if not items or any(not isinstance(s, str) or len(s) < 16 for s in items):
            raise ConfigurationError("each secret must be a string of at least 16 characters")
        self._keys = {key_id(s): s.encode() for s in items}

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def sign(self, message: bytes, kid: str | None = None) -> str:
        """A signature header value, `kid=hex`: with the signing key, or with the key `kid`
        (a worker answers with the key that signed the request, which its caller holds)."""
        kid = kid if kid is not None else next(iter(self._keys))
        return f"{kid}={_hmac(self._keys[kid], message)}"

    def verify(self, message: bytes, header: str) -> str | bool | None:
        """The key id of a signature that checks out; False if none does, None if no key id
        is known."""
        known = False
        for part in header.split(","):
            kid, sep, sig = part.strip().partition("=")
            key = self._keys.get(kid)
            if not sep or key is None:
                continue
            known = True
            expected = _hmac(key, message)
            if hmac.compare_digest(expected.encode(), sig.strip().encode("ascii", "replace")):
                return kid
        return False if known else None


def signed_headers(
    keyring: Keyring,
    path: str,
    function: str,
    request_id: str,
    body: bytes,
    fmt: str = MSGPACK,
    *,
    now: float,
) -> dict[str, str]:
    """Headers for one POST of `body`, whose envelope carries `request_id`, signed at the
    time `now` (the caller's clock: this module reads none)."""
    timestamp = f"{now:.3f}"
    message = string_to_sign("POST", path, function, timestamp, request_id, body)
    return {
        "Content-Type": fmt,
        "Accept": fmt,
        "Serverless-Version": str(VERSION),
        "Serverless-Function": function,
        "Serverless-Timestamp": timestamp,
        "Serverless-Request-Id": request_id,
        "Serverless-Signature": keyring.sign(message),
    }
