"""Quality benchmark: the default model over several training seeds on one split, mean ± std of
every metric next to the baselines (and the seed's configuration for reference).

    python bench/quality.py --data-dir ../shared/data/ml-100k [--seeds 3] [--work-dir DIR]

Prints figures; run by hand (takes about 2 minutes on 2 CPU cores).
"""

import argparse
import logging
import os
import tempfile

import numpy as np

from components.config import DEFAULT_TRAINING, SEED_TRAINING, PreprocessingConfig
from components.examples import load_stats
from components.report import format_table
from pipeline.experiments import baseline_rows, prepare_examples, train_and_evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "mtrec-bench"))
    parser.add_argument("--with-seed-config", action="store_true", help="also the seed's model")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    examples = prepare_examples(args.data_dir, args.work_dir, PreprocessingConfig())
    configs = {
        f"default seed={s}": DEFAULT_TRAINING.replace(shuffle_seed=s) for s in range(args.seeds)
    }
    if args.with_seed_config:
        configs["seed notebook config"] = SEED_TRAINING
    outcomes = train_and_evaluate(examples, configs)
    runs = [o for o in outcomes if o.name.startswith("default")]
    names = list(runs[0].metrics) + ["fit_seconds"]
    values = {
        n: np.array([o.seconds if n == "fit_seconds" else o.metrics[n] for o in runs])
        for n in names
    }
    summary = {"system": f"default model, {len(runs)} seeds (mean)"}
    spread = {"system": "  (std)"}
    for name, array in values.items():
        summary[name] = float(array.mean())
        spread[name] = float(array.std())
    rows = [summary, spread]
    rows += [{"system": o.name, **o.metrics, "fit_seconds": o.seconds} for o in outcomes]
    extra, _ = baseline_rows(examples, load_stats(examples)["max_user_id"] + 1)
    print(format_table(rows + extra))
    print()
    for name in (
        "hit@10",
        "recall@10",
        "ndcg@10",
        "seed_hit@10",
        "rmse",
        "rmse_stars",
        "fit_seconds",
    ):
        print(f"{name:12s} {values[name].mean():.4f} ± {values[name].std():.4f}")


if __name__ == "__main__":
    main()
