"""Peak RSS and wall time of the evaluation stage, the Beam job against the in-process reference.

    python bench/evaluation_memory.py --examples DIR --model DIR [--modes beam,in-process]
        [--beam-args "--direct_num_workers=1"]

Each mode runs in its own process (as a KFP task would); peak RSS is that process's (wait4),
with TensorFlow, the SavedModel and, on DirectRunner, the runner's in-memory shuffle included.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import sys
from components.config import GateConfig
from components.evaluation import evaluator, reference
mode, model, examples, beam_args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split()
config = GateConfig(evaluation_beam_args=tuple(beam_args))
run = evaluator.evaluate if mode == "beam" else reference.evaluate_in_process
result = run(model, examples, config)
print("hit@10", result.metrics["hit@10"], "rmse", result.metrics.get("rmse"))
"""


def measure(mode: str, model: str, examples: str, beam_args: str) -> tuple[float, float, str]:
    """(peak RSS in GiB, wall seconds, the child's last line) of one evaluation process."""
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TF_CPP_MIN_LOG_LEVEL": "2"}
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: progress lines never block
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, mode, model, examples, beam_args],
            env=env, stdout=log, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        _, status, usage = os.wait4(proc.pid, 0)
        log.seek(0)
        lines = log.read().strip().splitlines()
    if status:
        raise SystemExit(f"{mode}: exit status {status}")
    # ru_maxrss is in KiB on Linux.
    return usage.ru_maxrss / 1024**2, time.perf_counter() - started, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--modes", default="beam,in-process")
    parser.add_argument("--beam-args", default="")
    args = parser.parse_args()
    print("| evaluation | peak RSS (GB) | wall (s) | figures |")
    print("|---|---|---|---|")
    for mode in args.modes.split(","):
        rss, seconds, figures = measure(mode, args.model, args.examples, args.beam_args)
        print(f"| {mode} | {rss:.2f} | {seconds:.1f} | {figures} |", flush=True)


if __name__ == "__main__":
    main()
