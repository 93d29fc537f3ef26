"""The server's configuration: one typed dataclass, checked once, from which `mtrec serve`
builds its flags (each field's `help` metadata is the flag's help).

Kept free of TensorFlow and gRPC so building the CLI stays fast.
"""

import os
from dataclasses import dataclass, field, fields

from components.errors import MtrecError

LOOPBACK = "127.0.0.1"
MAX_PORT = 65535
MIB = 1024 * 1024
# prometheus-client's multiprocess mode (several gRPC processes): where each process's values
# live; read when prometheus-client is imported (here, so metrics and processes agree on it).
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
MAX_GRPC_PROCESSES = 64  # each loads every model: a typo must not start a thousand


class ConfigError(MtrecError):
    """A setting the server cannot run with; the message names the flag and what it got."""


def default_workers() -> int:
    """gRPC handler threads: 2 per core, 4 to 32. Batching merges the requests that wait while a
    model call runs, so a few threads keep the cores busy; more only contend for the GIL and
    the cores (measured on 2 cores, intra-op 1, bench/serving.py: 4 threads served 1,924-1,959
    req/s at 8 clients and 1,904-2,041 at 32, 16 threads 1,670-1,852 and 1,757-2,099, with
    ~35% more server CPU per request under load)."""
    return min(32, max(4, 2 * (os.cpu_count() or 1)))


@dataclass(frozen=True)
class ServerConfig:
    """What `mtrec serve` configures (flag = field name with dashes)."""

    model_base_path: str = field(
        default="",
        metadata={
            "help": "export base folder: serves <base>/<model-name>/<version>/ "
            "(the one-model shorthand of --model-config-file)"
        },
    )
    model_name: str = field(default="mtrec", metadata={"help": "model name with --model-base-path"})
    model_config_file: str = field(
        default="",
        metadata={
            "help": "TF Serving model config file (text ModelServerConfig with a "
            "model_config_list); replaces --model-base-path/--model-name"
        },
    )
    model_config_file_poll_wait_seconds: float = field(
        default=0.0, metadata={"help": "re-read --model-config-file this often (0: never)"}
    )
    host: str = field(
        default=LOOPBACK,
        metadata={"help": "interface to bind; 0.0.0.0 for every interface (containers)"},
    )
    port: int = field(default=8500, metadata={"help": "gRPC port (0: a free port)"})
    rest_port: int = field(
        default=0,
        metadata={"help": "TF Serving REST API port, e.g. 8501 (0: off; -1: a free port)"},
    )
    poll_seconds: float = field(
        default=2.0, metadata={"help": "how often to look for new versions (0: never)"}
    )
    keep_versions: int = field(
        default=1,
        metadata={
            "help": "versions kept loaded, newest first (TF Serving's latest{N}); "
            "older ones answer requests pinning model_spec.version"
        },
    )
    workers: int = field(
        default=0, metadata={"help": "gRPC handler threads (0: 2 per core, 4 to 32)"}
    )
    grpc_processes: int = field(
        default=1,
        metadata={
            "help": "processes answering gRPC on the port (SO_REUSEPORT), each with the models "
            "loaded and its own GIL: more requests/s on several cores, at the cost of memory; "
            "reloads, metrics and readiness stay those of one server"
        },
    )
    max_batch_size: int = field(
        default=4096, metadata={"help": "largest first (batch) dimension a request may send"}
    )
    max_dim_size: int = field(
        default=4096,
        metadata={
            "help": "largest size of any other dimension of an input "
            "(e.g. excluded_movie_ids per user)"
        },
    )
    max_string_bytes: int = field(
        default=4096,
        metadata={"help": "longest element of a string input (e.g. a raw id), in bytes"},
    )
    max_request_mib: int = field(
        default=16, metadata={"help": "largest gRPC message or REST body, in MiB"}
    )
    rest_max_connections: int = field(
        default=256, metadata={"help": "open REST connections beyond this get 503"}
    )
    rest_read_timeout_seconds: float = field(
        default=30.0, metadata={"help": "a REST request must arrive whole within this"}
    )
    rest_idle_timeout_seconds: float = field(
        default=30.0, metadata={"help": "an idle REST keep-alive connection is closed after this"}
    )
    grace_seconds: float = field(
        default=5.0, metadata={"help": "time in-flight requests get at shutdown"}
    )
    warm_up: bool = field(
        default=True,
        metadata={
            "help": "call every signature (or replay assets.extra/"
            "tf_serving_warmup_requests) before a version becomes AVAILABLE"
        },
    )
    batching: bool = field(
        default=True,
        metadata={"help": "merge concurrent requests to a signature into one model call"},
    )
    inter_op_threads: int = field(
        default=1,
        metadata={
            "help": "TensorFlow inter-op threads (1: lowest latency for these small "
            "graphs; 0: TensorFlow's default)"
        },
    )
    intra_op_threads: int = field(
        default=1,
        metadata={
            "help": "TensorFlow intra-op threads per call (1: each call runs in its handler "
            "thread, the cores serve concurrent requests; a 1-user retrieve takes 0.20 ms "
            "instead of 0.31 ms with TensorFlow's pool; 0: TensorFlow's default, for large "
            "single requests)"
        },
    )

    @property
    def max_request_bytes(self) -> int:
        return self.max_request_mib * MIB

    @property
    def grpc_workers(self) -> int:
        return self.workers or default_workers()

    def check(self) -> "ServerConfig":
        """Raise ConfigError naming the first bad setting; returns self."""
        problem = next(iter(self.problems()), None)
        if problem:
            raise ConfigError(problem)
        return self

    def problems(self) -> list[str]:
        """Every setting the server could not run with, one message each."""
        found = []
        if bool(self.model_base_path) == bool(self.model_config_file):
            found.append("give exactly one of --model-base-path or --model-config-file")
        if not self.model_config_file and not self.model_name:
            found.append("--model-name must not be empty")
        for name in ("port",):
            value = getattr(self, name)
            if not 0 <= value <= MAX_PORT:
                found.append(f"--{_flag(name)} must be in 0..{MAX_PORT}, got {value}")
        if not -1 <= self.rest_port <= MAX_PORT:
            found.append(f"--rest-port must be in -1..{MAX_PORT}, got {self.rest_port}")
        at_least = {
            "keep_versions": 1,
            "max_batch_size": 1,
            "max_dim_size": 1,
            "max_string_bytes": 1,
            "max_request_mib": 1,
            "rest_max_connections": 1,
            "workers": 0,
            "grpc_processes": 1,
            "inter_op_threads": 0,
            "intra_op_threads": 0,
        }
        for name, low in at_least.items():
            value = getattr(self, name)
            if value < low:
                found.append(f"--{_flag(name)} must be >= {low}, got {value}")
        if self.grpc_processes > MAX_GRPC_PROCESSES:
            found.append(
                f"--grpc-processes must be <= {MAX_GRPC_PROCESSES}, got {self.grpc_processes}"
            )
        if self.max_request_mib > 2047:
            found.append(
                f"--max-request-mib must be < 2048 (gRPC's limit), got {self.max_request_mib}"
            )
        non_negative = ("poll_seconds", "grace_seconds", "model_config_file_poll_wait_seconds")
        for name in non_negative:
            value = getattr(self, name)
            if not value >= 0:  # also refuses NaN
                found.append(f"--{_flag(name)} must be >= 0, got {value}")
        for name in ("rest_read_timeout_seconds", "rest_idle_timeout_seconds"):
            value = getattr(self, name)
            if not value > 0:
                found.append(f"--{_flag(name)} must be > 0, got {value}")
        if not self.host:
            found.append("--host must not be empty")
        return found


def _flag(name: str) -> str:
    return name.replace("_", "-")


def config_fields():
    """The fields `mtrec serve` turns into flags, in declaration order."""
    return fields(ServerConfig)
