"""The embedded local pool: its parent's half (pool: start, watch, replace, stop the worker
processes) and its children's (child: a worker process's entry point; modules: what a child
may import; byvalue: functions of `__main__`, sent by value to the children)."""
