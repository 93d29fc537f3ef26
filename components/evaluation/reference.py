"""The in-process evaluation: every test user's rows and top-k lists in numpy at once (4 GB at
25M ratings). Kept only as the reference the Beam job (`beam_pipeline.py`) is tested against.
"""

import importlib
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor

from components import features as F
from components import storage
from components.artifacts.examples import load_stats
from components.artifacts.saved_model import ServedModel
from components.artifacts.vocabulary import load_vocabularies
from components.config import GateConfig
from components.errors import DataError
from components.evaluation.evaluator import (
    SEED_REFERENCE,
    EvaluationResult,
    Scored,
    Split,
    beyond_accuracy,
    cold_start_notes,
    concat_splits,
    evaluate_baselines,
    score_served_model,
    sliced_tables,
)
from components.evaluation.gates import build_gates
from components.ingestion.layouts import ML_100K

log = logging.getLogger(__name__)


def evaluate_in_process(
    model_dir: str,
    examples_dir: str,
    config: GateConfig,
    previous_model_path: str | None = None,
) -> EvaluationResult:
    """The reference the Beam job is tested against: everything in numpy in this process
    (every test user's rows and top-k lists at once: 4 GB at 25M ratings)."""
    stats = load_stats(examples_dir)
    vocabularies = load_vocabularies(examples_dir, stats)
    train = Split.load(examples_dir, F.TRAIN_SPLIT)
    validation = Split.load_optional(examples_dir, F.VALIDATION_SPLIT)
    test = Split.load(examples_dir, F.TEST_SPLIT)
    seen = concat_splits(train, validation)  # every pair outside the test split is skipped
    num_rows = max(vocabularies.users.rows, int(test.users.max(initial=0)) + 1)
    explicit = bool(stats.get("explicit", True))
    # The baselines (numpy; EASE's linear algebra releases the GIL) run beside the SavedModel's
    # loading and scoring (TensorFlow ops): each waits less for the other on a few cores.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="baselines") as pool:
        pending = pool.submit(evaluate_baselines, train, validation, test, num_rows, explicit)
        pool.submit(
            importlib.import_module, "components.evaluation.report"
        )  # matplotlib, for the report
        candidate = ServedModel(model_dir, vocabularies)
        model = score_served_model(candidate, seen, test, train)
        baselines, notes = pending.result()
    notes += cold_start_notes(test)
    ranked = {"model": model, **{k: v for k, v in baselines.items() if isinstance(v, Scored)}}
    for scored in ranked.values():
        scored.metrics.update(beyond_accuracy(scored.top, test, train))
    previous = None
    if previous_model_path:
        log.info("comparing with the previously blessed model %s", previous_model_path)
        try:
            with (
                tempfile.TemporaryDirectory(prefix="mtrec-previous-") as workdir,
                storage.local_copy(previous_model_path, workdir) as local,
            ):
                previous_model = ServedModel(local, vocabularies)
                previous_metrics = score_served_model(previous_model, seen, test, train).metrics
        except DataError as err:  # another data set's model: nothing to compare with
            notes.append(f"previous model not compared: {err}")
        else:
            previous = {
                "version": int(storage.basename(previous_model_path)),
                "path": previous_model_path,
                "metrics": previous_metrics,
            }
    baseline_metrics = {
        name: value.metrics if isinstance(value, Scored) else value
        for name, value in baselines.items()
    }
    gates = build_gates(model.metrics, baseline_metrics, previous, config)
    return EvaluationResult(
        model.metrics,
        baseline_metrics,
        previous,
        gates,
        {name: scored.curve for name, scored in ranked.items()},
        sliced_tables({name: scored.top for name, scored in ranked.items()}, train, test),
        notes,
        dict(SEED_REFERENCE) if stats.get("layout", ML_100K.name) == ML_100K.name else None,
    )
