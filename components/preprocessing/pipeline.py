"""Stage 2, preprocessing (Apache Beam): parse, normalise, split, build vocabularies, write
TFRecords -- the pipeline that wires this package's transforms, and its entry point.

`parse.py` turns blocks of lines into chunks of numpy columns (bad lines become dead letters),
`splits.py` assigns each row its split, `vocabularies.py` counts the training ids, `tfrecords.py`
writes the Examples (vocabulary indices, ratings normalised over the data's own range).
Outputs: `tf.train.Example` TFRecords per split, `vocabulary/`, `stats.json`
(`components/artifacts/examples.py`).

The data is read three times, each read fused with its consumers (the key histogram; the rows at
the split cuts and the training split's id counts; assignment, indexing and writing), so no
PCollection of rows is ever materialised: memory is bounded by the vocabularies, not the rows.
Tested on DirectRunner and DaskRunner; the same transforms run on Dataflow/Flink/Spark: standard
Beam pipeline options pass straight through (`mtrec preprocess --beam-args ...`). The graph keeps
to what Beam 2.77's DaskRunner gets right (single-output DoFns, no output from `finish_bundle`, no
side input downstream of a write, a last transform reading every sink: README, "Other Beam
runners").
"""

import json
import logging
import os
import shutil
import time
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from components import features as F
from components.artifacts.examples import load_stats
from components.artifacts.ratings import read_report
from components.artifacts.vocabulary import (
    INT64,
    MOVIES_FILE,
    USERS_FILE,
    VOCABULARY_DIR,
)
from components.beam_runners import pipeline_options, run_pipeline
from components.config import PreprocessingConfig
from components.errors import MAX_REPORTED_PROBLEMS, DataError
from components.ingestion.layouts import LAYOUTS, ML_100K
from components.ingestion.parsing import (
    BadRow,
)
from components.preprocessing.parse import DEAD_LETTER_TAG, ParseRatings, ParseSettings, read_blocks
from components.preprocessing.splits import (
    SPLIT_LAST_K,
    SPLIT_RANDOM,
    LastKSplit,
    SplitRatings,
)
from components.preprocessing.tfrecords import TEMP_DIR, WriteExamplesFn, finalize_written
from components.preprocessing.vocabularies import (
    BuildVocabularies,
    IdStatsFn,
    vocabulary_text,
)
from components.storage import PARTIAL_SUFFIX, atomic_output_dir

log = logging.getLogger(__name__)


def _bad_row_json(bad: BadRow) -> str:
    return json.dumps(
        {"source": bad.source, "line": bad.line_number, "reason": bad.reason, "text": bad.line}
    )


def build_pipeline(
    pipeline: beam.Pipeline,
    ratings_paths: list[str],
    out_dir: str,
    config: PreprocessingConfig,
    source_names: dict[str, str] | None = None,
    ingestion: dict[str, Any] | None = None,
):
    """Wire the transforms: read -> parse (+dead letter) -> split -> TFRecords + stats.json.
    `ingestion` is ingestion.json's content: layout, rating scale, duplicate lines, row count."""
    names = source_names or {}
    ingestion = ingestion or {}
    layout = LAYOUTS[ingestion.get("layout", ML_100K.name)]
    stars_range = tuple(ingestion.get("stars_range", F.DEFAULT_STARS_RANGE))
    superseded = frozenset(ingestion.get("superseded_lines", ()))
    id_kinds = dict(ingestion.get("id_kinds") or {"user": INT64, "movie": INT64})
    total_rows = (ingestion.get("ratings_rows") or 0) - len(superseded) or None
    settings = ParseSettings(
        config.split_seed, config.split, layout, superseded, tuple(sorted(id_kinds.items()))
    )

    def read(label: str):
        """A fresh read of the ratings. Each pass fuses read -> parse -> its consumers, so no
        PCollection of rows is ever held (DirectRunner keeps in memory every PCollection a
        later stage reads): memory is bounded by the vocabularies, not the rows."""
        return (
            pipeline
            | f"{label}Paths" >> beam.Create(ratings_paths)
            | f"{label}Read" >> beam.FlatMap(lambda path: read_blocks(path, names.get(path, path)))
            | f"{label}Parse" >> ParseRatings(settings)
        )

    first, second, third = read("First"), read("Second"), read("Third")
    reads = {"first": first["ratings"], "second": second["ratings"]}
    if config.split == SPLIT_LAST_K:
        split = reads | "Split" >> LastKSplit(config.last_k, config.validation_fraction)
        thresholds = beam.pvalue.AsDict(split["thresholds"])
        last_k_validation = config.validation_fraction
    else:
        split = reads | "Split" >> SplitRatings(config.test_fraction, config.validation_fraction)
        thresholds = beam.pvalue.AsSingleton(split["thresholds"])
        last_k_validation = None

    # Vocabularies from the training split only (TFX's analyse-on-train), applied to every split.
    vocabularies = split["train_counts"] | "Vocabularies" >> beam.ParDo(
        BuildVocabularies(id_kinds, config.min_user_count, config.min_item_count)
    )
    vocabulary_files = []
    for role, attribute, file_name in (
        ("Users", "users", USERS_FILE),
        ("Movies", "movies", MOVIES_FILE),
    ):
        vocabulary_files.append(
            vocabularies
            | f"{role}VocabularyText"
            >> beam.Map(
                lambda vocab, attribute=attribute: vocabulary_text(getattr(vocab, attribute))
            )
            | f"Write{role}Vocabulary"
            >> beam.io.WriteToText(
                os.path.join(out_dir, VOCABULARY_DIR, file_name),
                shard_name_template="",
                num_shards=1,
            )
        )

    # One main-input chain from the writer to stats.json: DaskRunner recomputes whatever a side
    # input reads, so a side input downstream of WriteExamples would write the Examples again.
    by_split = (
        third["ratings"]
        | "WriteExamples"
        >> beam.ParDo(
            WriteExamplesFn(
                FileSystems.join(out_dir, TEMP_DIR), total_rows, stars_range, last_k_validation
            ),
            beam.pvalue.AsSingleton(vocabularies),
            thresholds,
        )
        | "CollectWritten" >> beam.combiners.ToList()
        | "FinalizeShards" >> beam.Map(finalize_written, out_dir)
    )
    dead = third[DEAD_LETTER_TAG]
    ratings = first["ratings"]
    dead_letters = (
        dead
        | "DeadLetterJson" >> beam.Map(_bad_row_json)
        | "WriteDeadLetter"
        >> beam.io.WriteToText(  # one shard: unsharded sinks emit from finish_bundle (see above)
            os.path.join(out_dir, F.DEAD_LETTER_PREFIX), file_name_suffix=".jsonl", num_shards=1
        )
    )
    invalid = dead | "CountInvalid" >> beam.combiners.Count.Globally()
    summary = ratings | "Stats" >> beam.CombineGlobally(IdStatsFn())

    def to_json(counts, stats, vocab, invalid):
        by_split = {
            name: counts[name] for name in (F.TRAIN_SPLIT, F.VALIDATION_SPLIT, F.TEST_SPLIT)
        }
        rows = sum(int(c[0]) for c in by_split.values()) + invalid
        stats = dict(stats)
        stats.update(
            {
                "rows": {name: int(c[0]) for name, c in by_split.items()},
                "invalid_rows": invalid,
                "invalid_share": invalid / rows if rows else 0.0,
                "split": config.split,
                "test_fraction": config.test_fraction,
                "validation_fraction": config.validation_fraction,
                "last_k": config.last_k,
                "split_seed": config.split_seed,
                "stars_range": list(stars_range),
                "superseded_rows": len(superseded),
                "layout": layout.name,
                "explicit": bool(ingestion.get("explicit", True)),
                "vocabulary": {
                    "users": vocab.users.size,
                    "movies": vocab.movies.size,
                    "id_kinds": id_kinds,
                    "min_user_count": config.min_user_count,
                    "min_item_count": config.min_item_count,
                    # Rows whose user / movie is out of vocabulary (index 0), per split.
                    "oov_user_rows": {name: int(c[1]) for name, c in by_split.items()},
                    "oov_movie_rows": {name: int(c[2]) for name, c in by_split.items()},
                },
            }
        )
        return json.dumps(stats, indent=2, sort_keys=True)

    stats_file = (
        by_split
        | "StatsJson"
        >> beam.Map(
            to_json,
            beam.pvalue.AsSingleton(summary),
            beam.pvalue.AsSingleton(vocabularies),
            beam.pvalue.AsSingleton(invalid),
        )
        | "WriteStats"
        >> beam.io.WriteToText(
            os.path.join(out_dir, F.STATS_FILE), shard_name_template="", num_shards=1
        )
    )
    # Last, a transform reading every sink's result: DaskRunner computes only what the pipeline's
    # last transform depends on, so the run waits on (and runs) all writes.
    _ = (*vocabulary_files, dead_letters, stats_file) | "AllWritten" >> beam.Flatten()
    return dead


def read_dead_letters(out_dir: str, limit: int = MAX_REPORTED_PROBLEMS) -> list[str]:
    problems: list[str] = []
    for name in sorted(os.listdir(out_dir)):
        if name.startswith(F.DEAD_LETTER_PREFIX):
            with open(os.path.join(out_dir, name), encoding="utf-8") as handle:
                for line in handle:
                    row = json.loads(line)
                    problems.append(f"{row['source']}, line {row['line']}: {row['reason']}")
                    if len(problems) >= limit:
                        return problems
    return problems


def run_preprocessing(
    ratings_dir: str,
    out_dir: str,
    config: PreprocessingConfig,
    beam_args: list[str] | None = None,
    source_name: str | None = None,
) -> dict[str, Any]:
    """Run the Beam pipeline on an ingestion output; returns stats.json's content.

    The outputs appear in `out_dir` only when the run succeeds and the share of malformed rows is
    within `config.max_invalid_share`; otherwise `out_dir` holds only `rejected/` (the dead
    letters) and a DataError names the first bad lines. An earlier run's output is removed
    first, so a failed re-run never leaves TFRecords a later stage could take for its input.
    """
    ratings_path = os.path.join(ratings_dir, F.RATINGS_FILE)
    if not os.path.isfile(ratings_path):
        raise DataError(f"{ratings_path}: not found (expected an ingestion output)")
    ingestion = read_report(ratings_dir)
    if config.split != SPLIT_RANDOM and not ingestion.get("has_timestamps", True):
        raise DataError(
            f"--split {config.split} orders ratings by time, and the interactions have no "
            "timestamp column (use --split random, or pass --timestamp-column)"
        )
    options = pipeline_options(config.runner, beam_args)
    started = time.perf_counter()
    kept = os.path.join(out_dir, F.REJECTED_DIR)
    rejected = f"{os.path.abspath(out_dir)}{PARTIAL_SUFFIX}{F.REJECTED_DIR}"
    try:
        with atomic_output_dir(out_dir) as staging:
            with run_pipeline(options, staging) as pipeline:
                build_pipeline(
                    pipeline,
                    [ratings_path],
                    staging,
                    config,
                    {ratings_path: source_name} if source_name else None,
                    ingestion,
                )
            shutil.rmtree(os.path.join(staging, TEMP_DIR), ignore_errors=True)  # emptied
            stats = load_stats(staging)
            if not stats["vocabulary"]["users"] or not stats["vocabulary"]["movies"]:
                raise DataError(
                    f"{ratings_path}: the training split holds no user or movie seen at least "
                    f"--min-user-count {config.min_user_count} / --min-item-count "
                    f"{config.min_item_count} times: nothing to train on"
                )
            stats["seconds"] = round(time.perf_counter() - started, 2)
            with open(os.path.join(staging, F.STATS_FILE), "w", encoding="utf-8") as handle:
                json.dump(stats, handle, indent=2, sort_keys=True)
            if stats["invalid_share"] > config.max_invalid_share:
                os.makedirs(rejected)
                for name in os.listdir(staging):
                    if name.startswith(F.DEAD_LETTER_PREFIX):
                        os.replace(os.path.join(staging, name), os.path.join(rejected, name))
                raise DataError(
                    f"{stats['invalid_rows']} malformed rating row(s) ({stats['invalid_share']:.2%}"
                    f" > max_invalid_share {config.max_invalid_share:.2%}); all of them are "
                    f"listed in {kept}. First: " + "; ".join(read_dead_letters(rejected))
                )
    except DataError:
        if os.path.isdir(rejected):
            os.makedirs(out_dir, exist_ok=True)
            os.replace(rejected, kept)
        raise
    for problem in read_dead_letters(out_dir):
        log.warning("dead letter: %s", problem)
    log.info("preprocessing: %s", json.dumps(stats, sort_keys=True))
    return stats
