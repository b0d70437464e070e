"""The calling process: the dispatcher's event-loop thread and what runs on it (the call's
plan, the fan-out, flow control, pacing, work-sharing) and the transports that carry chunks
(the lean HTTP client, an in-process double). Never imports _worker: the two sides meet only
on the wire (_wire) and at the top level, which wires them together."""
