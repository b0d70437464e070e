"""Small real Flask, Django and FastAPI apps with the worker route mounted, for the tests."""
