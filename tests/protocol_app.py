"""The worker route served by the protocol tests: `tests.protocol_app:app` (ASGI, uvicorn) and
`tests.protocol_app:wsgi_app` (WSGI, gunicorn). The secret comes from $SERVERLESS_SECRET."""

from __future__ import annotations

import os

import serverless
import tests.sample_functions  # noqa: F401  # registers the functions the tests call

ROUTE = "/serverless"
MAX_BODY = 1024 * 1024  # small, so that the oversized-body tests stay cheap

route = serverless.init(ROUTE, os.environ["SERVERLESS_SECRET"], max_body=MAX_BODY)
app = route.asgi()
wsgi_app = route.wsgi()
