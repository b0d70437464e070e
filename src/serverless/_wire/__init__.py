"""The wire: pure code both sides share. Envelopes, signatures, both halves of the exchange
(build a request and read its reply; the worker's checks live in _worker), values and their
bounds. No I/O, no clock reads (times are passed in), no process state."""
