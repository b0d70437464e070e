"""The worker route with the default limits (32 MiB bodies), for the memory and replay tests:
`tests.security_app:app` (ASGI) and `tests.security_app:wsgi_app` (WSGI)."""

from __future__ import annotations

import os

import serverless
import tests.sample_functions  # noqa: F401  # registers the functions the tests call

route = serverless.init("/serverless", os.environ["SERVERLESS_SECRET"])
app = route.asgi()
wsgi_app = route.wsgi()
