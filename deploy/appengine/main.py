"""App Engine entrypoint: the simple-serverless worker route as a WSGI app (main:app).

The secret comes from Secret Manager (SERVERLESS_SECRET_RESOURCE in app.yaml), unless
SERVERLESS_SECRET is already set (local runs). If your App Engine app is a Flask or Django app,
mount the route in it instead (README, "Scale out") and keep the secret code.
"""

from __future__ import annotations

import os

import serverless


def _secret_from_secret_manager() -> None:
    resource = os.environ.get("SERVERLESS_SECRET_RESOURCE")
    if resource and not os.environ.get("SERVERLESS_SECRET"):
        from google.cloud import secretmanager  # google-cloud-secret-manager, requirements.txt

        client = secretmanager.SecretManagerServiceClient()
        payload = client.access_secret_version(name=resource).payload.data
        os.environ["SERVERLESS_SECRET"] = payload.decode().strip()


_secret_from_secret_manager()
app = serverless.worker_wsgi()  # imports $SERVERLESS_MODULES; serves /serverless and /healthz
