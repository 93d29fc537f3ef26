"""Multi-worker training: where the time goes, 1 worker against N, and a projection to N machines.

    python bench/distributed_training.py --examples DIR [--workers 1,2] [--epochs 1] [--runs 1]
        [--train-args "--preset large"] [--allreduce-steps 200]

For each worker count it runs `mtrec train --workers N` (its own process, as the KFP task) and
reads the launcher's per-worker fit times: examples/s per worker and in all. Then it measures
the all-reduce of one step's gradients on its own: 2 worker processes on loopback under
MultiWorkerMirroredStrategy build the model for these examples and settings and all-reduce, step
after step, gradients shaped as training's are (dense layers dense; with lazy embedding updates
the tables' gradients as IndexedSlices of a batch's rows, which the collective all-gathers). The
communication share of the 2-worker fit is all-reduce seconds x steps / fit seconds.

Projection to N machines, each with the cores this run gave one worker: a step costs the
measured compute (the 1-worker fit's seconds per step) plus the all-reduce, whose ring cost
grows as 2(N-1)/N of the 2-worker one (bandwidth-bound; loopback is faster than a network, so
the projection is an upper bound on the speed-up); speed-up(N) = N x compute / (compute +
allreduce(N)). On this 2-core machine 2 workers share the cores, so the measured 2-worker fit is
not a speed-up measurement: it shows the overheads (one step per call, the collective), not
parallel compute. Run by hand; it is not a test.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def train(examples: str, workers: int, epochs: int, train_args: list[str]) -> dict:
    out = tempfile.mkdtemp(prefix="mtrec-bench-dist-")
    command = [sys.executable, "-m", "pipeline.cli", "train", "--examples", examples,
               "--output", os.path.join(out, "model"), "--epochs", str(epochs),
               "--workers", str(workers), *train_args]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    log = done.stdout + done.stderr
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{log[-3000:]}")
    fits = [float(s) for s in re.findall(r"worker \d+: fit ([\d.]+)s", log)]
    if not fits:
        fits = [float(s) for s in re.findall(r"fit took ([\d.]+)s", log)]
    steps = sum(int(m) for m in re.findall(r'"total": (\d+), "unit": "steps"', log)[-1:])
    subprocess.run(["rm", "-rf", out])
    return {"wall": wall, "fit": max(fits), "steps": steps}


def allreduce_worker(examples: str, train_args: list[str], steps: int, report: str) -> None:
    """One of the 2 measuring processes (TF_CONFIG set by `measure_allreduce`)."""
    import tensorflow as tf

    from components.config import TRAINING_PRESETS, TrainingConfig
    from components.training.trainer import build_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="default")
    known, _ = parser.parse_known_args(train_args)
    config: TrainingConfig = TRAINING_PRESETS[known.preset]
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = build_model(examples, config)
    tables = {
        layer.embeddings.path for layer in model._flatten_layers() if hasattr(layer, "embeddings")
    }
    batch = config.batch_size

    def gradients():
        out = []
        for variable in model.trainable_variables:
            if config.lazy_embedding_updates and variable.path in tables:
                rows = tf.random.uniform([batch], 0, variable.shape[0], dtype=tf.int64)
                shape = tf.constant(list(variable.shape), tf.int64)
                out.append(tf.IndexedSlices(tf.ones([batch, variable.shape[1]]), rows, shape))
            else:
                out.append(tf.ones(variable.shape))
        return out

    @tf.function
    def step():
        def reduce():
            return tf.distribute.get_replica_context().all_reduce("SUM", gradients())

        return strategy.run(reduce)

    for _ in range(10):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - started) / steps
    dense = sum(
        v.numpy().nbytes
        for v in model.trainable_variables
        if v.path not in tables or not config.lazy_embedding_updates
    )
    with open(report, "w") as handle:
        json.dump({"seconds_per_step": seconds, "dense_bytes": dense}, handle)


def measure_allreduce(examples: str, train_args: list[str], steps: int) -> dict:
    from components.training.launcher import cluster_config, free_ports

    addresses = [f"127.0.0.1:{p}" for p in free_ports(2)]
    work = tempfile.mkdtemp(prefix="mtrec-bench-allreduce-")
    processes = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps(cluster_config(addresses, index)),
               "PYTHONPATH": ROOT}  # fmt: skip
        processes.append(subprocess.Popen(
            [sys.executable, __file__, "--examples", examples, "--allreduce-worker",
             os.path.join(work, f"{index}.json"), "--allreduce-steps", str(steps),
             "--train-args", " ".join(train_args)],
            env=env, stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, f"{index}.log"), "w")))  # noqa: SIM115  # fmt: skip
    if any(p.wait() for p in processes):
        raise SystemExit(f"the all-reduce measurement failed: see {work}")
    with open(os.path.join(work, "0.json")) as handle:
        return json.load(handle)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", required=True)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--train-args", default="--preset large")
    parser.add_argument("--allreduce-steps", type=int, default=200)
    parser.add_argument("--allreduce-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    train_args = args.train_args.split()
    if args.allreduce_worker:
        allreduce_worker(args.examples, train_args, args.allreduce_steps, args.allreduce_worker)
        return
    with open(os.path.join(args.examples, "stats.json")) as handle:
        rows = json.load(handle)["rows"]["train"] * args.epochs
    results = {}
    for workers in [int(w) for w in args.workers.split(",")]:
        runs = [train(args.examples, workers, args.epochs, train_args) for _ in range(args.runs)]
        results[workers] = {
            key: statistics.median(r[key] for r in runs) for key in ("wall", "fit", "steps")
        }
    reduce = measure_allreduce(args.examples, train_args, args.allreduce_steps)
    print(f"train rows x epochs: {rows}; settings: {args.train_args!r}; medians of {args.runs}")
    print(
        "| workers | process s | fit s | steps/worker | examples/s total | examples/s per worker | all-reduce share |"
    )
    print("|---|---|---|---|---|---|---|")
    for workers, r in results.items():
        share = "-" if workers == 1 else f"{reduce['seconds_per_step'] * r['steps'] / r['fit']:.0%}"
        print(f"| {workers} | {r['wall']:.1f} | {r['fit']:.1f} | {r['steps']} | "
              f"{rows / r['fit']:,.0f} | {rows / r['fit'] / workers:,.0f} | {share} |")  # fmt: skip
    one = results.get(1)
    print(f"\nall-reduce of one step's gradients, 2 workers on loopback: "
          f"{reduce['seconds_per_step'] * 1e3:.2f} ms ({reduce['dense_bytes'] / 1e3:,.0f} kB of dense gradients, plus the tables' rows)")  # fmt: skip
    if one:
        compute = one["fit"] / one["steps"]
        print(f"compute per step (1 worker): {compute * 1e3:.2f} ms\n")
        print("| machines N | projected step ms | projected speed-up |")
        print("|---|---|---|")
        for n in (1, 2, 4, 8, 16, 32):
            allreduce = 0.0 if n == 1 else reduce["seconds_per_step"] * 2 * (n - 1) / n
            print(
                f"| {n} | {(compute + allreduce) * 1e3:.2f} | {n * compute / (compute + allreduce):.1f}x |"
            )


if __name__ == "__main__":
    main()
