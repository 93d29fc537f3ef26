"""The evaluation as a Beam job (the role TFMA plays in TFX): every figure, slice, baseline and
gate input of the stage, from per-batch sufficient statistics.

Why: the in-process evaluation held every test user's rows and top-k lists in numpy (4 GB at
25M ratings). Here the train, validation and test rows are read from the examples' TFRecords
CHUNK_ROWS at a time, each chunk cut into parts by its users' batch (`user // batch`: a fixed
range of user ids, so a user's rows of every split meet in one batch and are never collected in
one process; `user_batches.py`), and the parts joined by batch over their Flatten
(SHUFFLE_GROUPS GroupByKeys, by `batch % SHUFFLE_GROUPS`); each assembled batch is written to
the job's workdir (`user_batches.save_batch`) and the PCollection holds its path; each batch goes
to DoFns (`scoring.py`) that yield one dict of sums per batch from `process`;
`StatsCombineFn` adds them.

Why keyed batches, not a CoGroupByKey by user and `beam.BatchElements`: BatchElements emits each
bundle's last batch from `finish_bundle`, which Beam 2.77's DaskRunner drops (the users of those
batches were lost there: README, "Other Beam runners"); a GroupByKey by batch emits nothing from
`finish_bundle`, gives the same batches (users and rows sorted) on every runner and run, and is
one shuffle instead of a shuffle and a batching step. The ParDos that read the batches with side
inputs computed from the batches (EASE's validation, the scoring, the bias sweeps) read them
through `beam_runners.read_apart`, without which DaskRunner's side inputs count the reading
task's batches more than once. Above EASE's item limit the graph is refused on DaskRunner
(`DASK_ROUNDS`: the sweeps' chain of side inputs would be recomputed exponentially there).

Stages (a fixed number, no chain that grows with the data): 3 reads, 1 Flatten, SHUFFLE_GROUPS
filters + GroupByKeys (by batch) + spills, 1 Flatten; catalogue sums (one global combine: popularity, raters, training mean, cold
start, and within EASE's item limit its Gram matrix and the bias model's sums), whose derived
side inputs are computed once (on DaskRunner, again by each task that reads them); EASE's
lambda chosen on validation (one ParDo + combine); the scoring ParDo + combine; one write.
Above EASE's item limit the bias model needs its sweeps as rounds (one ParDo + combine each,
`n_sweeps` of them, bounded). Memory per worker: one batch of users with their rows plus the
catalogue-sized side inputs (items^2 for EASE within its limit) and the SavedModel(s); the
runner itself holds or spills the grouped rows (DirectRunner holds them: the parts' arrays,
10 to 14 bytes a row, ~3x that for one group while it encodes that group's input).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import apache_beam as beam
import numpy as np

from components import features as F
from components import storage
from components.artifacts.examples import load_stats, split_files
from components.beam_runners import (
    AsRepeatedSingleton,
    is_dask,
    pipeline_options,
    read_apart,
    run_pipeline,
)
from components.evaluation import metrics as M
from components.evaluation import statistics as S
from components.evaluation.baselines import (
    DEFAULT_ITEM_REG,
    EASE,
    EASE_LAMBDAS,
    EASE_MAX_ITEMS,
    BiasModel,
    bias_item_sweeps,
    choose_by_validation,
    ease_skip_reason,
)
from components.evaluation.scoring import (
    EaseValidationFn,
    ScoreBatchFn,
    bias_sweep_sums,
    catalogue_sums,
)
from components.evaluation.user_batches import assemble, cut_by_batch, save_batch

BATCH_USERS = 4096  # users per scoring batch (as score_served_model's batches)
RESULT_FILE = "evaluation-statistics.json"
DASK_ROUNDS = (
    f"the Beam evaluation of a catalogue above EASE's item limit ({EASE_MAX_ITEMS} movies) does "
    "not run on DaskRunner: the bias model's sweeps are a chain of side inputs, each computed "
    "from the one before, and DaskRunner evaluates a side input's whole producer again in every "
    "task that reads it, so the work grows as (partitions + 1) ** sweeps (README, 'Other Beam "
    "runners'); run the evaluation on DirectRunner or another runner"
)


CHUNK_ROWS = 262_144  # rows parsed at a time (tf.io.parse_example), ~4 MB of columns
# GroupByKeys the parts go through (batch % SHUFFLE_GROUPS): DirectRunner's FnApiRunner encodes a
# GroupByKey's whole input into one buffer when its reader starts, ~3x the shuffled bytes at once;
# in groups that transient is a group's share (100M ratings: 8.6 GB peak with one GroupByKey and
# the batches held in memory, 5.46 GB with 8 groups and the batches spilled).
SHUFFLE_GROUPS = 8


def _in_group(part: tuple[int, Any], group: int) -> bool:
    return part[0] % SHUFFLE_GROUPS == group


class ReadBatchedRowsFn(beam.DoFn):
    """One TFRecord shard of a split in, its rows out as (batch, (split, columns)) parts
    (`user_batches.cut_by_batch`), parsed CHUNK_ROWS at a time."""

    def __init__(self, name: str, batch_users: int) -> None:
        self.name, self.batch_users = name, batch_users

    def process(self, path: str):
        from components.artifacts.examples import iter_columns

        for chunk in iter_columns([path], CHUNK_ROWS):
            yield from cut_by_batch(chunk, self.name, self.batch_users)


def _read(pipeline, name: str, examples_dir: str, split: str, batch_users: int):
    return (
        pipeline
        | f"{name}: files" >> beam.Create(split_files(examples_dir, split))
        | f"{name}: read by batch" >> beam.ParDo(ReadBatchedRowsFn(name, batch_users))
    )


def side_inputs(cat: dict[str, Any], width: int) -> dict[str, Any]:
    """Catalogue-sized values derived once from the catalogue sums (the scoring's side input)."""
    counts = np.asarray(cat["item_counts"], dtype=np.int64)
    test_movies = np.flatnonzero(np.asarray(cat["test_movie_rows"]))
    train_movies = np.flatnonzero(counts)
    num_items = int(max(train_movies.max(initial=0), test_movies.max(initial=0))) + 1
    mean = cat["rating_sum"] / cat["rating_rows"]
    return {
        "width": width,
        "num_items": num_items,
        "ranking": S.popularity_ranking(list(enumerate(counts.tolist()))),
        "popularity_bucket": M.popularity_buckets(counts),
        "raters": np.asarray(cat["raters"], dtype=np.float64),
        "train_users": int(cat["train_users"]),
        "candidates": int(train_movies.size),
        "mean32": float(np.float32(mean)),
        "mean64": float(mean),
        "not_candidate": counts[:num_items] == 0,
        "cold": (int(cat["cold_users"]), int(cat["cold_movies"])),
    }


def fit_ease(cat: dict[str, Any], side: dict[str, Any], has_validation: bool):
    """(EASE fitted on the summed Gram, or None, why not)."""
    reason = ease_skip_reason(side["num_items"], EASE_MAX_ITEMS)
    if reason:
        return None, reason
    if not has_validation:
        return None, "EASE skipped: no validation split to choose its lambda on"
    n = side["num_items"]
    return EASE(EASE_LAMBDAS[0]).fit_gram(np.asarray(cat["gram"])[:n, :n]), ""


def choose_ease(sums: dict[str, Any], fitted) -> dict[str, Any]:
    """EASE's lambda chosen on validation hit@10 (as evaluator.fit_ease), its weights, the note."""
    ease, reason = fitted
    if ease is None:
        return {"note": reason, "weights": None}
    rows = sums.get("rows", 0)
    scores = {
        lam: (sums[f"hits/{i}"] / rows if rows else 0.0) for i, lam in enumerate(EASE_LAMBDAS)
    }
    chosen = choose_by_validation(scores)
    grid = ", ".join(f"{lam:g}: {value:.4f}" for lam, value in scores.items())
    return {
        "note": f"EASE lambda {chosen:g} chosen on validation hit@10 ({grid})",
        "weights": ease.weights_for(chosen),
        "num_items": ease.num_items,
    }


def bias_from_gram(cat: dict[str, Any], sweeps: int) -> dict[str, Any]:
    mu = cat["rating_sum"] / cat["rating_rows"]
    counts = np.asarray(cat["item_counts"], dtype=np.float64)
    residual = np.asarray(cat["item_rating_sum"]) - counts * mu
    terms = np.asarray(cat["terms_sum"]) - mu * np.asarray(cat["terms_count"])
    previous, items = bias_item_sweeps(
        counts, residual, terms, np.asarray(cat["user_gram"]), sweeps
    )
    return {"mu": mu, "previous": previous, "items": items}


def _bias_rounds(batches, catalogue, width: int, sweeps: int):
    """The bias model's alternating sweeps as rounds over the batches (catalogues above EASE's
    limit, where the Gram form does not fit): one ParDo + combine per sweep, `sweeps` in all."""
    state = catalogue | "bias: start" >> beam.Map(
        lambda cat: {
            "mu": cat["rating_sum"] / cat["rating_rows"],
            "previous": np.zeros(width),
            "items": np.zeros(width),
            "counts": np.asarray(cat["item_counts"], dtype=np.float64),
        }
    )
    for sweep in range(sweeps):
        sums = read_apart(
            batches,
            f"bias: sweep {sweep}",
            beam.Map(
                lambda batch, st: bias_sweep_sums(batch, st["items"], st["mu"], width),
                AsRepeatedSingleton(state),
            ),
        ) | f"bias: sum {sweep}" >> beam.CombineGlobally(S.StatsCombineFn())
        state = sums | f"bias: movies {sweep}" >> beam.Map(_next_sweep, AsRepeatedSingleton(state))
    return state


def _next_sweep(sums: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    denom = state["counts"] + DEFAULT_ITEM_REG
    residual = np.asarray(sums.get("item_residual", np.zeros(denom.size)), dtype=np.float64)
    items = np.divide(residual, denom, out=np.zeros_like(denom), where=denom > 0)
    return {**state, "previous": state["items"], "items": items}


def build_graph(
    pipeline,
    models: dict[str, str],
    examples_dir: str,
    settings: dict[str, Any],
    out_path: str,
    spill_dir: str,
):
    """Wire the stages (module docstring); writes one JSON line of summed statistics."""
    stats = load_stats(examples_dir)
    width = int(stats["vocabulary"]["movies"]) + 1
    dense = width <= EASE_MAX_ITEMS
    if not dense and is_dask(pipeline):
        raise NotImplementedError(DASK_ROUNDS)
    has_validation = bool(stats["rows"].get(F.VALIDATION_SPLIT))
    splits = {"train": F.TRAIN_SPLIT, "test": F.TEST_SPLIT}
    if has_validation:
        splits["validation"] = F.VALIDATION_SPLIT
    batch_users = settings["batch"]
    rows = [
        _read(pipeline, name, examples_dir, split, batch_users) for name, split in splits.items()
    ] | "rows" >> beam.Flatten()
    batches = [
        rows
        | f"shuffle {group}: select" >> beam.Filter(_in_group, group)
        | f"shuffle {group}: join by batch" >> beam.GroupByKey()
        | f"shuffle {group}: batch users"
        >> beam.MapTuple(
            lambda key, parts: save_batch(
                assemble(key, parts, batch_users),
                storage.join(spill_dir, f"batch-{key:08d}.npz"),
            )
        )
        for group in range(SHUFFLE_GROUPS)
    ] | "batches" >> beam.Flatten()
    catalogue = (
        batches
        | "catalogue: batch sums" >> beam.Map(catalogue_sums, width, dense)
        | "catalogue: sum" >> beam.CombineGlobally(S.StatsCombineFn())
    )
    side = catalogue | "side inputs" >> beam.Map(side_inputs, width)
    fitted = catalogue | "EASE: fit" >> beam.Map(
        fit_ease, AsRepeatedSingleton(side), has_validation
    )
    ease = (
        read_apart(
            batches,
            "EASE: validation",
            beam.ParDo(
                EaseValidationFn(EASE_LAMBDAS, settings["hit_stars"]),
                AsRepeatedSingleton(fitted),
                AsRepeatedSingleton(side),
            ),
        )
        | "EASE: validation sum" >> beam.CombineGlobally(S.StatsCombineFn())
        | "EASE: choose lambda" >> beam.Map(choose_ease, AsRepeatedSingleton(fitted))
    )
    sweeps = BiasModel().n_sweeps
    if dense:
        bias = catalogue | "bias: fit" >> beam.Map(bias_from_gram, sweeps)
    else:
        bias = _bias_rounds(batches, catalogue, width, sweeps)
    return (
        read_apart(
            batches,
            "score",
            beam.ParDo(
                ScoreBatchFn(models, examples_dir, settings),
                AsRepeatedSingleton(side),
                AsRepeatedSingleton(ease),
                AsRepeatedSingleton(bias),
            ),
        )
        | "score: sum" >> beam.CombineGlobally(S.StatsCombineFn())
        | "to json" >> beam.Map(_result_json, AsRepeatedSingleton(side), AsRepeatedSingleton(ease))
        | "write" >> beam.io.WriteToText(out_path, shard_name_template="", num_shards=1)
    )


def _result_json(sums: dict[str, Any], side: dict[str, Any], ease: dict[str, Any]) -> str:
    return json.dumps(
        {
            "sums": {key: np.asarray(value).tolist() for key, value in sums.items()},
            "candidates": side["candidates"],
            "cold": list(side["cold"]),
            "ease_note": ease["note"],
            "ease": ease["weights"] is not None,
        }
    )


def evaluate_beam(
    model_dir: str,
    examples_dir: str,
    previous_model_dir: str | None = None,
    runner: str = "DirectRunner",
    beam_args: list[str] | None = None,
    batch: int | None = None,
) -> dict[str, Any]:
    """Run the job; returns the figures `evaluator.evaluate` reports: "model", "previous",
    "baselines", "curves", "slices", "ease_note", "cold" (test rows of unknown users, movies)."""
    from components.artifacts.saved_model import read_metadata

    stats = load_stats(examples_dir)
    low, high = stats.get("stars_range", F.DEFAULT_STARS_RANGE)
    explicit = bool(stats.get("explicit", True))
    settings = {
        "batch": batch or BATCH_USERS,
        "hit_stars": float(high),
        "relevant_stars": low + 0.75 * (high - low),
        "explicit": explicit,
    }
    models = {"model": model_dir}
    if previous_model_dir:
        models["previous"] = previous_model_dir
    with tempfile.TemporaryDirectory(prefix="mtrec-eval-beam-") as workdir:
        out_path = os.path.join(workdir, RESULT_FILE)
        with run_pipeline(pipeline_options(runner, beam_args), workdir) as pipeline:
            build_graph(
                pipeline, models, examples_dir, settings, out_path, os.path.join(workdir, "batches")
            )
        with open(out_path, encoding="utf-8") as handle:
            result = json.loads(handle.read())
    sums = {k: np.asarray(v) if isinstance(v, list) else v for k, v in result["sums"].items()}
    per_unit = float(high - low)

    def served(name: str, path: str) -> dict[str, float]:
        info = read_metadata(path)
        k = min(S.K, int(info["k"]))
        metrics = S.topk_figures(sums, f"{name}/", k)
        metrics["seed_hit@10"] = float(S.hit_curve(sums, f"{name}/seed_", k)[-1])
        if f"{name}/rated" in sums:
            metrics.update(S.rating_figures(sums, f"{name}/", per_unit))
        return metrics

    model = served("model", model_dir)
    model_k = int(read_metadata(model_dir)["k"])
    curves = {"model": S.hit_curve(sums, "model/", model_k)}
    popularity = S.topk_figures(sums, "popularity/", S.K)
    popularity["seed_hit@10"] = float(S.hit_curve(sums, "popularity/seed_", S.K)[-1])
    baselines: dict[str, dict[str, float]] = {"popularity": popularity}
    ranked = ["model", "popularity"]
    curves["popularity"] = S.hit_curve(sums, "popularity/", S.K)
    if result["ease"]:
        baselines["EASE"] = S.topk_figures(sums, "EASE/", S.K)
        curves["EASE"] = S.hit_curve(sums, "EASE/", S.K)
        ranked.append("EASE")
    if explicit:
        baselines["global mean"] = S.rating_figures(sums, "global mean/", per_unit)
        baselines["user+item bias"] = S.rating_figures(sums, "user+item bias/", per_unit)
    model.update(S.beyond_figures(sums, "model/", result["candidates"]))
    for name in ranked[1:]:
        baselines[name].update(S.beyond_figures(sums, f"{name}/", result["candidates"]))
    labels = {S.ACTIVITY_TITLE: tuple(M.bucket_labels()), S.POPULARITY_TITLE: M.POPULARITY_LABELS}
    return {
        "model": model,
        "previous": served("previous", previous_model_dir) if previous_model_dir else None,
        "baselines": baselines,
        "curves": curves,
        "slices": S.sliced_rows(sums, ranked, labels),
        "ease_note": result["ease_note"],
        "cold": tuple(result["cold"]),
    }
