"""simple-serverless: run a list-in/list-out function in parallel on HTTP workers.

@serverless.parallel
def geolocate(zipcodes):
    return [get_address(zipcode) for zipcode in zipcodes]
"""

from ._caller.metrics import caller_metrics
from ._caller.store import ResultStore, StoreStats, open_store
from ._config import Options
from ._exceptions import (
    ConfigurationError,
    DeadlineExceeded,
    ProtocolError,
    RemoteError,
    RemoteTraceback,
    RequestRejected,
    SerializationError,
    ServerlessError,
    StillThrottled,
    StoreError,
    Throttled,
    TooManyFailures,
    WorkerError,
    WorkerTimeout,
    WorkerUnavailable,
)
from ._function import ParallelFunction, SequentialFunction, parallel, sequential
from ._pipeline import Pipeline
from ._pool.pool import shutdown
from ._stats import ChunkStats, PipelineRun, Progress, StepStats, Try
from ._worker.route import WorkerRoute, init
from ._worker.serve import worker_asgi, worker_wsgi

__version__ = "0.1.0"

__all__ = [
    "ChunkStats",
    "ConfigurationError",
    "DeadlineExceeded",
    "Options",
    "ParallelFunction",
    "Pipeline",
    "PipelineRun",
    "Progress",
    "ProtocolError",
    "RemoteError",
    "RemoteTraceback",
    "RequestRejected",
    "ResultStore",
    "SequentialFunction",
    "SerializationError",
    "ServerlessError",
    "StepStats",
    "StillThrottled",
    "StoreError",
    "StoreStats",
    "Throttled",
    "TooManyFailures",
    "Try",
    "WorkerError",
    "WorkerRoute",
    "WorkerTimeout",
    "WorkerUnavailable",
    "__version__",
    "caller_metrics",
    "init",
    "open_store",
    "parallel",
    "sequential",
    "shutdown",
    "worker_asgi",
    "worker_wsgi",
]
