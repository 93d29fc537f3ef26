"""Starts a multi-worker training on this machine: N worker processes on loopback, each with
the TF_CONFIG a Kubeflow TFJob gives its replicas, watched until all succeed or one fails
(`mtrec train --workers N`). The workers themselves are `components/training/distributed.py`;
this module imports no TensorFlow and nothing of the trainer (which calls it).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from components import features as F
from components import storage
from components.config import TrainingConfig
from components.errors import TrainingError

log = logging.getLogger(__name__)

WORKER_MODULE = "components.training.distributed"
REPORT_FILE = "worker-{index}.json"
LOG_FILE = "worker-{index}.log"
STOP_GRACE_SECONDS = 10  # SIGTERM, then SIGKILL, for the workers left when one failed
POLL_SECONDS = 0.5


def cluster_config(addresses: list[str], index: int) -> dict[str, Any]:
    """The TF_CONFIG of worker `index` of a cluster of `addresses` ("host:port"), as a TFJob
    with only Worker replicas gives it."""
    return {"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": index}}


def worker_command(
    examples: str, model: str, config: TrainingConfig, model_name: str, refit_on_all: bool
) -> list[str]:
    """The command every replica runs (the same on each; TF_CONFIG tells them apart)."""
    command = [
        "python", "-m", WORKER_MODULE,
        "--examples", examples,
        "--model", model,
        "--training-config", json.dumps(config.to_dict()),
        "--model-name", model_name,
    ]  # fmt: skip
    return command + (["--refit-on-all"] if refit_on_all else [])


def _die_with_parent() -> None:
    """In the child: SIGKILL when the launcher dies, so no worker waits forever in a collective."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _last_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            lines = [line.strip() for line in handle if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("mtrec: error:")]
    return (errors or lines or [""])[-1][:300]


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def train_on_local_workers(
    examples_dir: str,
    model_dir: str,
    config: TrainingConfig,
    model_name: str = F.DEFAULT_MODEL_NAME,
    refit_on_all: bool = False,
) -> dict[str, list[float]]:
    """Train with `config.workers` worker processes on loopback; publish the chief's SavedModel
    to `model_dir` (atomically) only if every worker succeeded and their weights agree; returns
    the history. A worker that dies stops the others and ends the run with a TrainingError
    naming it; nothing is published, and an earlier model at `model_dir` stays."""
    from components.artifacts.saved_model import read_history

    count = config.workers
    model_dir = os.path.abspath(model_dir)
    parent = os.path.dirname(model_dir)
    os.makedirs(parent, exist_ok=True)
    # Beside model_dir (same file system: the publish is a rename); nothing reads this name.
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(model_dir)}.workers-", dir=parent)
    chief_model = os.path.join(scratch, "model")
    addresses = [f"127.0.0.1:{port}" for port in free_ports(count)]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    command = worker_command(examples_dir, chief_model, config, model_name, refit_on_all)
    command = [sys.executable, *command[1:], "--report-dir", scratch]
    processes: list[subprocess.Popen] = []
    logs = [os.path.join(scratch, LOG_FILE.format(index=i)) for i in range(count)]
    try:
        for index in range(count):
            env = {
                **os.environ,
                "TF_CONFIG": json.dumps(cluster_config(addresses, index)),
                "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))),
            }
            # The chief's output (progress markers, epoch lines) is the run's; the others' is
            # kept for the error message.
            with open(logs[index], "wb") as worker_log:
                processes.append(
                    subprocess.Popen(
                        command,
                        env=env,
                        stdout=None if index == 0 else worker_log,
                        stderr=subprocess.STDOUT if index else None,
                        preexec_fn=_die_with_parent,
                    )
                )
        log.info("training on %d workers on loopback: %s", count, ", ".join(addresses))
        while True:
            codes = [process.poll() for process in processes]
            failed = [i for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                index = failed[0]
                _stop(processes)
                detail = _last_line(logs[index])
                raise TrainingError(
                    f"training worker {index} of {count} {_describe_exit(codes[index])}; the "
                    "other workers were stopped and no model was published"
                    + (f" (its last words: {detail})" if detail else "")
                )
            if all(code == 0 for code in codes):
                break
            time.sleep(POLL_SECONDS)
        reports = []
        for index in range(count):
            with open(os.path.join(scratch, REPORT_FILE.format(index=index))) as handle:
                reports.append(json.load(handle))
        digests = {report["weights_sha256"] for report in reports}
        if len(digests) != 1:
            raise TrainingError(
                f"the {count} training workers ended with different weights: the replicas fell "
                "out of sync; no model was published"
            )
        for report in reports:
            log.info(
                "worker %d: fit %.1fs, gradients %s",
                report["index"],
                report["fit_seconds"],
                sorted(set(report["gradient_kinds"].values())) or "-",
            )
        with storage.atomic_output_dir(model_dir) as staging:
            os.rmdir(staging)
            os.replace(chief_model, staging)
        return read_history(model_dir)
    finally:
        _stop(processes)
        shutil.rmtree(scratch, ignore_errors=True)
