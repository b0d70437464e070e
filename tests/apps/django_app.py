"""A single-file Django project with the worker route mounted in one line (as in wsgi.py).

gunicorn -k gthread --threads 16 -w 2 tests.apps.django_app:application
"""

from __future__ import annotations

import os

from django.conf import settings

settings.configure(
    DEBUG=False,
    SECRET_KEY="django-insecure-tests-only",
    ROOT_URLCONF=__name__,
    ALLOWED_HOSTS=["127.0.0.1", "localhost"],
    INSTALLED_APPS=[],
    MIDDLEWARE=[],
)

from django.core.wsgi import get_wsgi_application  # noqa: E402
from django.http import HttpRequest, JsonResponse  # noqa: E402
from django.urls import path  # noqa: E402

import serverless  # noqa: E402
from tests import sample_functions  # noqa: E402  # the functions this app's workers run


def square(request: HttpRequest) -> JsonResponse:
    n = int(request.GET.get("n", "10"))
    result, stats = sample_functions.square.with_stats(list(range(n)))
    response = JsonResponse(result, safe=False)
    response["X-Serverless-Target"] = stats.target
    response["X-Serverless-Processes"] = str(stats.processes)
    return response


def pid(request: HttpRequest) -> JsonResponse:
    return JsonResponse(os.getpid(), safe=False)


urlpatterns = [path("square", square), path("pid", pid)]

SECRET = os.environ["SERVERLESS_SECRET"]
application = serverless.init("/serverless", SECRET).wsgi(get_wsgi_application())
