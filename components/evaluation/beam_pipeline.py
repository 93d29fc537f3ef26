"""The model's test figures as a Beam job (the role TFMA plays in TFX).

Why: the in-process evaluation holds every test user's rows and top-k lists in numpy (4 GB at
25M ratings). Here the test rows and the seen rows (train + validation) are read from the
examples' TFRecords, keyed by user and joined with CoGroupByKey, so one user's rows meet in one
place; users travel in batches (`beam.BatchElements`) to a DoFn that loads the SavedModel once
per worker (`setup`) and yields one statistics dict per batch from `process` (never only from
`finish_bundle`, which DaskRunner drops); `statistics.StatsCombineFn` sums them. The training
mean (the rating of unknown ids) is a global combine used as a singleton side input. Memory per
worker: the model (catalogue-sized) plus one batch of users with their rows; nothing grows with
the number of users or ratings except the grouped PCollections the runner itself holds/spills.

Stages: 3 reads, 2 keyed maps, 1 CoGroupByKey, 1 BatchElements, 1 scoring DoFn, 1 global
combine, 1 mean combine (side input), 1 write of the combined statistics.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import apache_beam as beam
import numpy as np

from components import features as F
from components.artifacts.examples import SCHEMA, load_stats, split_files
from components.beam_runners import pipeline_options
from components.evaluation.statistics import (
    StatsCombineFn,
    add,
    finish,
    popularity_ranking,
    popularity_top,
    user_topk_stats,
)

BATCH_USERS = 4096  # as score_served_model's batches
RESULT_FILE = "model-statistics.json"


def parse_example(record: bytes) -> tuple[int, int, float, float]:
    """(user, movie, rating, stars) of one serialised tf.train.Example of the examples' schema."""
    from tensorflow.core.example import example_pb2

    feature = example_pb2.Example.FromString(record).features.feature
    value = {
        name: (
            feature[name].int64_list.value[0]
            if kind == "int"
            else feature[name].float_list.value[0]
        )
        for name, kind in SCHEMA.items()
        if name in feature
    }
    return (
        int(value[F.USER_ID]),
        int(value[F.MOVIE_ID]),
        float(value[F.RATING]),
        float(value[F.STARS]),
    )


def _read(pipeline, label: str, examples_dir: str, split: str):
    files = split_files(examples_dir, split)
    return (
        pipeline
        | f"{label}: files" >> beam.Create(files)
        | f"{label}: read" >> beam.io.ReadAllFromTFRecord()
        | f"{label}: parse" >> beam.Map(parse_example)
    )


class ScoreUsers(beam.DoFn):
    """Scores a batch of users through the SavedModel's signatures and yields its statistics.

    The model is loaded once per DoFn instance (`setup`), i.e. once per worker thread."""

    def __init__(self, model_dir: str, examples_dir: str, settings: dict[str, Any]):
        self.model_dir, self.examples_dir, self.settings = model_dir, examples_dir, settings

    def setup(self):
        from components.artifacts.saved_model import ServedModel
        from components.artifacts.vocabulary import load_vocabularies

        vocabularies = load_vocabularies(self.examples_dir, load_stats(self.examples_dir))
        self.model = ServedModel(self.model_dir, vocabularies)

    def process(self, batch, train_mean, ranking):
        s, model = self.settings, self.model
        k = min(s["k"], model.k)
        users = np.array([user for user, _, _ in batch], dtype=np.int64)
        known = users > 0
        empty = np.full((len(users), model.k), -1, dtype=np.int32)
        top, top_seen = empty.copy(), empty.copy()
        ranking = np.asarray(ranking, dtype=np.int64)
        if known.any():
            excluded = [np.asarray(seen, dtype=np.int64) for (u, _, seen) in batch if u > 0]
            top[known] = model.top_k(users[known], excluded)
            top_seen[known] = model.top_k(users[known])
        stats: dict[str, Any] = {}
        user_rows, movie_rows, rating_rows = [], [], []
        for i, (user, test_rows, _) in enumerate(batch):
            movies = np.array([m for m, _, _ in test_rows], dtype=np.int64)
            stars = np.array([st for _, _, st in test_rows], dtype=np.float64)
            for prefix, lists in (("", top), ("seed_", top_seen)):
                one = user_topk_stats(
                    lists[i], movies, stars, k, s["hit_stars"], s["relevant_stars"], prefix
                )
                if prefix:  # the seed's metric needs only its hit counts
                    one = {key: one[key] for key in ("seed_hits", "seed_hit_rows")}
                stats = add(stats, one)
            seen = np.asarray(batch[i][2], dtype=np.int64)
            popular = popularity_top(ranking, seen, s["k"]).reshape(1, -1)
            for prefix, lists in (
                ("popularity/", popular),
                ("popularity/seed_", popularity_top(ranking, seen[:0], s["k"]).reshape(1, -1)),
            ):
                one = user_topk_stats(
                    lists[0], movies, stars, s["k"], s["hit_stars"], s["relevant_stars"], prefix
                )
                if prefix.endswith("seed_"):
                    one = {key: one[key] for key in (prefix + "hits", prefix + "hit_rows")}
                stats = add(stats, one)
            user_rows.append(np.full(len(movies), user))
            movie_rows.append(movies)
            rating_rows.append([r for _, r, _ in test_rows])
        if model.rates:
            u, m = np.concatenate(user_rows), np.concatenate(movie_rows)
            ratings = np.concatenate([np.asarray(r, dtype=np.float64) for r in rating_rows])
            # As score_served_model: float32 predictions, the training mean for unknown ids.
            predicted = np.full(len(u), float(train_mean), dtype=np.float32)
            scorable = (u > 0) & (m > 0)
            if scorable.any():
                predicted[scorable] = model.predict_rating(u[scorable], m[scorable])
            error = predicted.astype(np.float64) - ratings.astype(np.float32).astype(np.float64)
            stats = add(stats, {"squared_error": float(np.sum(error**2)), "rating_rows": len(u)})
        yield stats


def _with_seen(element):
    """(user, ([test rows], [seen movies])) -> (user, test rows, seen movies), test users only."""
    user, (test_rows, seen) = element
    test_rows = list(test_rows)
    if test_rows:
        yield user, test_rows, list(seen)


def build_graph(
    pipeline, model_dir: str, examples_dir: str, settings: dict[str, Any], out_path: str
):
    """The graph: read, key by user, CoGroupByKey, batch, score, combine, write one JSON line."""
    stats = load_stats(examples_dir)
    train = _read(pipeline, "train", examples_dir, F.TRAIN_SPLIT)
    seen_parts = [train]
    if stats["rows"].get(F.VALIDATION_SPLIT):
        seen_parts.append(_read(pipeline, "validation", examples_dir, F.VALIDATION_SPLIT))
    test = _read(pipeline, "test", examples_dir, F.TEST_SPLIT)
    seen = (
        seen_parts | "seen: flatten" >> beam.Flatten()
        | "seen: by user" >> beam.Map(lambda row: (row[0], row[1]))
    )  # fmt: skip
    test_by_user = test | "test: by user" >> beam.Map(
        lambda row: (row[0], (row[1], row[2], row[3]))
    )
    train_mean = (
        train
        | "train: ratings" >> beam.Map(lambda row: row[2])
        | "train: mean" >> beam.combiners.Mean.Globally()
    )
    ranking = (
        train
        | "train: movies" >> beam.Map(lambda row: row[1])
        | "train: movie counts" >> beam.combiners.Count.PerElement()
        | "train: counts list" >> beam.combiners.ToList()
        | "popularity ranking" >> beam.Map(lambda counts: popularity_ranking(counts).tolist())
    )  # catalogue-sized: one side input
    return (
        {"test": test_by_user, "seen": seen}
        | "join by user" >> beam.CoGroupByKey()
        | "test users"
        >> beam.FlatMap(lambda kv: _with_seen((kv[0], (kv[1]["test"], kv[1]["seen"]))))
        | "batch users" >> beam.BatchElements(min_batch_size=1, max_batch_size=settings["batch"])
        | "score"
        >> beam.ParDo(
            ScoreUsers(model_dir, examples_dir, settings),
            beam.pvalue.AsSingleton(train_mean),
            beam.pvalue.AsSingleton(ranking),
        )
        | "combine" >> beam.CombineGlobally(StatsCombineFn())
        | "to json"
        >> beam.Map(lambda s: json.dumps({k: np.asarray(v).tolist() for k, v in s.items()}))
        | "write" >> beam.io.WriteToText(out_path, shard_name_template="")
    )


def score_model_beam(
    model_dir: str,
    examples_dir: str,
    runner: str = "DirectRunner",
    beam_args: list[str] | None = None,
    k: int = 10,
    batch: int = BATCH_USERS,
) -> dict[str, Any]:
    """The served model's figures (as `evaluator.score_served_model`): {"metrics", "curve",
    "baselines": {"popularity": {"metrics", "curve"}}}."""
    from components.artifacts.saved_model import read_metadata

    stats = load_stats(examples_dir)
    low, high = stats.get("stars_range", F.DEFAULT_STARS_RANGE)
    settings = {
        "k": k,
        "batch": batch,
        "hit_stars": float(high),
        "relevant_stars": low + 0.75 * (high - low),
    }
    info = read_metadata(model_dir)
    explicit = F.SIGNATURE_RANK in info.get("signatures", [F.SIGNATURE_RANK])
    with tempfile.TemporaryDirectory(prefix="mtrec-eval-beam-") as workdir:
        out_path = os.path.join(workdir, RESULT_FILE)
        with beam.Pipeline(options=pipeline_options(runner, beam_args)) as pipeline:
            build_graph(pipeline, model_dir, examples_dir, settings, out_path)
        with open(out_path, encoding="utf-8") as handle:
            summed = {
                key: np.asarray(v) if isinstance(v, list) else v
                for key, v in json.loads(handle.read()).items()
            }
    out = finish(summed, min(k, int(info["k"])), explicit, float(high - low))
    out["baselines"] = {"popularity": finish(summed, k, False, float(high - low), "popularity/")}
    return out
