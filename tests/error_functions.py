"""Functions for tests/integration/test_errors.py. A `serverless worker` that imports only
tests.sample_functions does not know them (an unregistered function)."""

from __future__ import annotations

import urllib.request

import aiohttp
import requests

import serverless


@serverless.parallel
def fetch(urls: list[str], client: str) -> list[int]:
    """GET each URL with `client` ("requests" or "urllib"), raising on an HTTP error status as
    everyday code does."""
    statuses = []
    for url in urls:
        if client == "requests":
            response = requests.get(url, timeout=10)
            response.raise_for_status()
            statuses.append(response.status_code)
        else:
            with urllib.request.urlopen(url, timeout=10) as answer:
                statuses.append(answer.status)
    return statuses


@serverless.parallel
async def afetch(urls: list[str]) -> list[int]:
    """fetch with aiohttp, on the worker's event loop."""
    statuses = []
    async with aiohttp.ClientSession(raise_for_status=True) as session:
        for url in urls:
            async with session.get(url) as response:
                statuses.append(response.status)
    return statuses
