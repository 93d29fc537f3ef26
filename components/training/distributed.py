"""Multi-worker training: tf.distribute.MultiWorkerMirroredStrategy, the engine a Kubeflow TFJob
drives (synchronous data parallelism: every worker holds the whole model, trains on its shard of
the rows, and the gradients are summed across workers by a collective all-reduce each step).

Two ways in, one worker:
- On Kubeflow, the Training Operator starts the TFJob's replicas with `TF_CONFIG` set, each
  running `python -m components.training.distributed --examples URI --model URI ...`
  (pipeline/tfjob.py builds that job).
- Locally, `mtrec train --workers N` (`TrainingConfig.workers`) calls `launcher.train_on_local_workers`,
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
import tempfile
import time
from typing import Any

from components import features as F
from components import storage
from components.config import ConfigError, TrainingConfig
from components.errors import exit_on_error
from components.training.launcher import REPORT_FILE, WORKER_MODULE

log = logging.getLogger(__name__)


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
