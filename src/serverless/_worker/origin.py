"""Where call-back-to-self sends chunks: an origin the operator or the platform vouches for.

Never a request header. `Host` and `X-Forwarded-*` come from whoever reaches the app, so an
origin built from them let an anonymous client choose where the app POSTs chunks signed with
its secret (issue 14: signed SSRF and forged results). In order:

1. `self_url` (`init(self_url=)`, `$SERVERLESS_SELF_URL`): the operator's URL, whatever the
   request says.
2. `trusted_hosts` (`init(trusted_hosts=)`, `$SERVERLESS_TRUSTED_HOSTS`), in the spirit of
   Django's ALLOWED_HOSTS: the request's `Host` is used only if it is on the list, port
   included (an entry without a port allows only the scheme's default port).
3. The platform: on App Engine, a `Host` naming this very project on appspot.com (project ids
   are global, so only this project answers there); the callback is pinned to this service
   and version (`VERSION-dot-SERVICE-dot-PROJECT[.REGION.r].appspot.com`).
4. The server's own socket when it is a loopback address (a local development server): the
   address comes from getsockname() on the accepted connection, not from the client.

Otherwise the callback is refused with a ConfigurationError naming the settings.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from .._exceptions import ConfigurationError

SELF_URL_ENV = "SERVERLESS_SELF_URL"
TRUSTED_HOSTS_ENV = "SERVERLESS_TRUSTED_HOSTS"

# A Host header value: a DNS name or an IP literal, then an optional port (Django's shape).
_HOST = re.compile(r"([a-z0-9.-]+|\[[a-f0-9:.]+\])(?::([0-9]{1,5}))?")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_APPSPOT = re.compile(r"(?:[a-z0-9-]+-dot-)*([a-z0-9-]+(?:\.[a-z0-9]+\.r)?\.appspot\.com)")


def _split_host(host: str) -> tuple[str, int | None] | None:
    match = _HOST.fullmatch(host.strip().lower())
    if match is None:
        return None
    name, port = match.group(1).rstrip("."), match.group(2)
    return name, int(port) if port else None


@dataclass(frozen=True)
class OriginPolicy:
    """The operator's and the platform's word on this app's own worker URL."""

    self_url: str | None = None
    trusted_hosts: tuple[str, ...] = ()
    gae: tuple[str, str, str] | None = None  # (project, service, version), from App Engine
    platform: str = ""  # a platform that gives no usable URL (Cloud Run, Knative, Kubernetes)

    @classmethod
    def configured(
        cls,
        self_url: str | None = None,
        trusted_hosts: Iterable[str] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> OriginPolicy:
        """Arguments first, then the environment; checked here so a mistake fails at init."""
        env = os.environ if environ is None else environ
        url = self_url or env.get(SELF_URL_ENV, "").strip() or None
        if url is not None:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
                raise ConfigurationError(
                    f"self_url / ${SELF_URL_ENV} must be http(s)://host[:port]/route: {url!r}"
                )
        if trusted_hosts is None:
            raw = env.get(TRUSTED_HOSTS_ENV, "")
            trusted_hosts = [h for h in (part.strip() for part in raw.split(",")) if h]
        hosts = tuple(h.strip().lower() for h in trusted_hosts)
        for host in hosts:
            bare = host[1:] if host.startswith(".") else host
            if _split_host(bare) is None:
                raise ConfigurationError(
                    f"trusted_hosts / ${TRUSTED_HOSTS_ENV}: {host!r} is not a host name "
                    "('*' is refused: it would let any client choose where signed chunks go)"
                )
        gae = None
        if env.get("GAE_ENV") == "standard" or env.get("GAE_APPLICATION"):
            project, service = env.get("GOOGLE_CLOUD_PROJECT", ""), env.get("GAE_SERVICE", "")
            version = env.get("GAE_VERSION", "")
            if project and service and version:
                gae = (project.lower(), service.lower(), version.lower())
        platform = ""
        if env.get("K_SERVICE"):
            platform = "Cloud Run / Knative"
        elif env.get("KUBERNETES_SERVICE_HOST"):
            platform = "Kubernetes"
        return cls(url, hosts, gae, platform)

    def _trusted(self, name: str, port: int | None, scheme: str) -> bool:
        default = _DEFAULT_PORTS.get(scheme)
        for entry in self.trusted_hosts:
            wildcard = entry.startswith(".")
            parsed = _split_host(entry[1:] if wildcard else entry)
            if parsed is None:
                continue
            want_name, want_port = parsed
            if want_port is None:
                if port not in (None, default):
                    continue
            elif (port or default) != want_port:
                continue
            if name == want_name or (wildcard and name.endswith("." + want_name)):
                return True
        return False

    def resolve(
        self,
        route: str,
        host: str,
        scheme: str,
        root_path: str,
        server: tuple[str, int] | None,
    ) -> tuple[str | None, str]:
        """The callback URL for a request (or None) and, if None, why.

        host: the request's Host header (untrusted); scheme, root_path: as the server decided
        them (uvicorn and gunicorn honour X-Forwarded-Proto only from their allowed proxies);
        server: the accepted connection's local address, from the socket.
        """
        if self.self_url is not None:
            return self.self_url, ""
        if root_path and not root_path.startswith("/"):
            root_path = ""  # never let a prefix extend the host part of the URL
        parsed = _split_host(host) if host else None
        if parsed is not None:
            name, port = parsed
            if self.trusted_hosts and self._trusted(name, port, scheme):
                return f"{scheme}://{host.strip().lower()}{root_path}{route}", ""
            if self.gae is not None:
                project, service, version = self.gae
                match = _APPSPOT.fullmatch(name)
                if match and match.group(1).split(".", 1)[0] == project and port is None:
                    base = f"{version}-dot-{service}-dot-{match.group(1)}"
                    return f"https://{base}{root_path}{route}", ""
        if server is not None and is_loopback(server[0]):
            address, port_number = server
            literal = f"[{address}]" if ":" in address else address
            return f"http://{literal}:{port_number}{root_path}{route}", ""
        return None, self._refusal(host)

    def _refusal(self, host: str) -> str:
        where = f" on {self.platform}" if self.platform else ""
        return (
            f"call-back-to-self refused: the request's Host {host[:100]!r} is not trusted and "
            f"no origin is configured{where}. Set serverless.init(self_url=...) or "
            f"${SELF_URL_ENV} to this app's worker URL (e.g. the load balancer's "
            f"https://.../serverless), or list the host in init(trusted_hosts=[...]) / "
            f"${TRUSTED_HOSTS_ENV}; or send the chunks elsewhere with init(url=...) / "
            "$SERVERLESS_URL"
        )


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@functools.lru_cache(maxsize=256)
def resolve_origin(
    policy: OriginPolicy,
    route: str,
    host: str,
    scheme: str,
    root_path: str,
    server: tuple[str, int] | None,
) -> tuple[str | None, str]:
    """policy.resolve, remembered: the adapters ask for every request to the wrapped app."""
    return policy.resolve(route, host, scheme, root_path, server)
