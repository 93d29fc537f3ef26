"""Multi-worker training: tf.distribute.MultiWorkerMirroredStrategy, the engine a Kubeflow TFJob
drives (synchronous data parallelism: every worker holds the whole model, trains on its shard of
the rows, and the gradients are summed across workers by a collective all-reduce each step).

Two ways in, one worker:
- On Kubeflow, the Training Operator starts the TFJob's replicas with `TF_CONFIG` set, each
  running `python -m components.training.distributed --examples URI --model URI ...`
  (pipeline/tfjob.py builds that job).
- Locally, `mtrec train --workers N` (`TrainingConfig.workers`) calls `train_on_local_workers`,
  which starts the same command N times on loopback, each with the `TF_CONFIG` the operator would
  give it, watches them, and publishes the chief's SavedModel only when every worker succeeded.

Worker 0 is the chief (TF's convention for a cluster without a "chief" replica): it writes the
SavedModel to `--model`. The others export too, into scratch folders they delete, as TF's
multi-worker guide requires (an export reads the variables, which may need a collective that
every worker must join). Each worker writes a report (its shard, timings, a digest of its final
weights, the kinds of gradient the lazy optimizer received); the launcher checks that the
digests agree, i.e. that the replicas stayed in sync.

Gradients: Keras' optimizer all-reduces with SUM; the model's loss is divided by the number of
replicas (model.py), so the summed gradient is the mean over the global batch. A table gradient
that is a `tf.IndexedSlices` (lazy_embedding_updates: no dense regularizer on the tables) stays
one across the all-reduce: TensorFlow's collective all-reduce all-gathers its rows and values
(N x the batch's rows, not the table), and the lazy optimizer sums repeated rows; the reports'
`gradient_kinds` say what the optimizer received. Without lazy updates the tables' L2
regularizer makes their gradients dense, and they are all-reduced as dense tensors.
"""

from __future__ import annotations

import argparse
import hashlib
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
from components.config import ConfigError, TrainingConfig
from components.errors import TrainingError, exit_on_error

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


def task_from_environment(environ: dict[str, str] | None = None) -> tuple[int, int]:
    """(this worker's index, the number of workers) from TF_CONFIG."""
    raw = (os.environ if environ is None else environ).get("TF_CONFIG")
    if not raw:
        raise ConfigError(
            "TF_CONFIG is not set: a training worker needs the cluster it belongs to (the "
            "Training Operator sets it in a TFJob; `mtrec train --workers N` sets it locally)"
        )
    try:
        config = json.loads(raw)
        workers = config["cluster"]["worker"]
        kind, index = config["task"]["type"], int(config["task"]["index"])
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"TF_CONFIG: not a cluster and task ({error}): {raw[:200]}") from None
    if kind != "worker" or "chief" in config["cluster"]:
        raise ConfigError(
            f"TF_CONFIG: task type {kind!r}: mtrec's TFJob has Worker replicas only (worker 0 "
            "is the chief)"
        )
    if not 0 <= index < len(workers):
        raise ConfigError(f"TF_CONFIG: task index {index} outside the {len(workers)} workers")
    return index, len(workers)


def weights_digest(model) -> str:
    """sha256 of every weight's bytes: equal on every worker when the replicas stayed in sync."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(weight.tobytes())
    return digest.hexdigest()


def run_worker(
    examples: str,
    model: str,
    config: TrainingConfig,
    model_name: str = F.DEFAULT_MODEL_NAME,
    refit_on_all: bool = False,
    report_dir: str | None = None,
) -> dict[str, Any]:
    """One worker of a multi-worker training (TF_CONFIG in the environment); returns its report.
    `examples` and `model` may be local paths or object-store URIs (s3://, gs://)."""
    import tensorflow as tf

    from components.training.trainer import fit_and_export

    index, count = task_from_environment()
    if config.workers not in (1, count):
        raise ConfigError(f"training config says workers={config.workers}, TF_CONFIG has {count}")
    config = config.replace(workers=count)
    chief = index == 0
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    started = time.perf_counter()
    workdir = tempfile.mkdtemp(prefix=f"mtrec-worker-{index}-")
    try:
        with storage.local_copy(examples, workdir) as examples_dir:
            local_model = model if chief and not storage.is_remote(model) else None
            target = local_model or os.path.join(workdir, "model")
            fitted, history, fit_seconds = fit_and_export(
                examples_dir, target, config, model_name, refit_on_all, strategy=strategy
            )
            if chief and local_model is None:
                from components.artifacts.saved_model import SAVED_MODEL_FILE

                storage.upload_dir(target, model, last=SAVED_MODEL_FILE)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report = {
        "index": index,
        "workers": count,
        "chief": chief,
        "weights_sha256": weights_digest(fitted),
        "fit_seconds": round(fit_seconds, 3),
        "seconds": round(time.perf_counter() - started, 3),
        "gradient_kinds": dict(getattr(fitted.optimizer, "gradient_kinds", {})),
        "embedding_tables": sorted(fitted.row_l2()),
        "final": {name: values[-1] for name, values in history.items()},
    }
    if report_dir:
        with open(os.path.join(report_dir, REPORT_FILE.format(index=index)), "w") as out:
            json.dump(report, out, indent=2)
    log.info("worker %d of %d done: %s", index, count, json.dumps(report))
    return report


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


def _free_ports(count: int) -> list[int]:
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
    addresses = [f"127.0.0.1:{port}" for port in _free_ports(count)]
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=f"python -m {WORKER_MODULE}",
        description="One worker of a multi-worker training (TF_CONFIG names its cluster).",
    )
    parser.add_argument("--examples", required=True, help="preprocessing output (path or URI)")
    parser.add_argument("--model", required=True, help="where the chief writes the SavedModel")
    parser.add_argument("--training-config", default="{}", help="TrainingConfig as JSON")
    parser.add_argument("--model-name", default=F.DEFAULT_MODEL_NAME)
    parser.add_argument("--refit-on-all", action="store_true")
    parser.add_argument("--report-dir", help="folder for worker-<index>.json")
    args = parser.parse_args(argv)
    with exit_on_error():
        try:
            settings = json.loads(args.training_config)
        except ValueError as error:
            raise ConfigError(f"--training-config: not JSON ({error})") from None
        run_worker(
            args.examples,
            args.model,
            TrainingConfig.from_dict(settings),
            args.model_name,
            args.refit_on_all,
            args.report_dir,
        )


if __name__ == "__main__":
    main()
