"""A worker process: the route that admits, authenticates and runs chunks (endpoint, execute),
its WSGI and ASGI adapters, what it may hold for a stranger (admission, replay, gate), the
origin it calls back to, and the servers that host it (serve, uvserver). Never imports
_caller: a worker that fans out again does so through the top level."""
