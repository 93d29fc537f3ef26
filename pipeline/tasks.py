"""The pipeline's KFP components: thin wrappers that call one stage's logic in `components/`.

As in TFX (component spec apart from executor), they live apart from the stages so that building
or compiling the DAG imports neither Beam nor TensorFlow. KFP ships each function's source to
its container, so every import a function needs is inside it.
"""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output


def ingestion_op(
    data_dir: str,
    ingestion_config: dict,
    ratings: Output[Dataset],
    movies: Output[Dataset],
):
    """Ingest your own interaction logs, a MovieLens folder or tensorflow-datasets into ratings
    and movies artifacts."""
    from components.config import IngestionConfig
    from components.errors import exit_on_error
    from components.ingestion.ingest import run_ingestion

    with exit_on_error():
        config = IngestionConfig.from_dict(ingestion_config)
        report = run_ingestion(data_dir, ratings.path, movies.path, config)
        ratings.metadata.update(
            {
                "source": report.source,
                "rows": report.ratings_rows,
                "invalid_rows": report.invalid_rows,
            }
        )
        movies.metadata["movies"] = report.movies


def preprocessing_op(
    ratings: Input[Dataset], preprocessing_config: dict, examples: Output[Dataset]
):
    """Beam: parse, normalise and split the ratings into TFRecords (+ stats.json, dead letters)."""
    from components.config import PreprocessingConfig
    from components.errors import exit_on_error
    from components.preprocessing.pipeline import run_preprocessing

    with exit_on_error():
        config = PreprocessingConfig.from_dict(preprocessing_config)
        stats = run_preprocessing(
            ratings.path, examples.path, config, source_name=ratings.metadata.get("source")
        )
        examples.metadata.update({"rows": stats["rows"], "invalid_rows": stats["invalid_rows"]})


def training_op(
    examples: Input[Dataset],
    training_config: dict,
    model_name: str,
    model: Output[Model],
    training_metrics: Output[Metrics],
    refit_on_all: bool = False,
):
    """Train the multi-task recommender (on the GPU the task requests, when present) and write
    the serving SavedModel as the Model artifact; `refit_on_all`: the final fit on every split."""
    from components.config import TrainingConfig
    from components.errors import exit_on_error
    from components.training.trainer import run_training

    with exit_on_error():
        history = run_training(
            examples.path,
            model.path,
            TrainingConfig.from_dict(training_config),
            model_name,
            refit_on_all,
        )
        for name, values in history.items():
            training_metrics.log_metric(f"final_{name}", values[-1])
        model.metadata.update({"framework": "tensorflow", "format": "SavedModel"})


def training_tfjob_op(
    examples: Input[Dataset],
    training_config: dict,
    model_name: str,
    tfjob: dict,
    staging: str,
    task_id: str,
    model: Output[Model],
    training_metrics: Output[Metrics],
    refit_on_all: bool = False,
):
    """Train on several workers: a TFJob (Kubeflow Training Operator) built at compile time
    (pipeline/tfjob.py) runs MultiWorkerMirroredStrategy; the examples go to shared staging,
    the chief's SavedModel comes back as the Model artifact, the staging is removed."""
    import shutil

    from components import storage
    from components.artifacts.saved_model import read_history
    from components.errors import exit_on_error
    from pipeline.tfjob import fill_manifest, job_name, run_tfjob

    with exit_on_error():
        name = job_name(task_id, refit_on_all)
        root = storage.join(staging, name)
        try:
            storage.upload_dir(examples.path, storage.join(root, "examples"))
            job = fill_manifest(
                tfjob,
                name,
                storage.join(root, "examples"),
                storage.join(root, "model"),
                training_config,
                model_name,
                refit_on_all,
            )
            run_tfjob(job, timeout=int(job["spec"]["runPolicy"]["activeDeadlineSeconds"]))
            shutil.rmtree(model.path, ignore_errors=True)
            storage.download_dir(storage.join(root, "model"), model.path)
        finally:
            storage.remove(root)
        for metric, values in read_history(model.path).items():
            training_metrics.log_metric(f"final_{metric}", values[-1])
        model.metadata.update({"framework": "tensorflow", "format": "SavedModel", "tfjob": name})


def evaluation_op(
    model: Input[Model],
    examples: Input[Dataset],
    gate_config: dict,
    serving_model_dir: str,
    model_name: str,
    metrics: Output[Metrics],
    blessing: Output[Artifact],
    report: Output[HTML],
) -> bool:
    """Score the trained SavedModel on the test split against baselines and the previously
    blessed model; bless it when every gate passes.

    Returns `blessed` as the task's `Output` parameter (what the DAG's condition reads)."""
    import os
    import shutil

    from components.config import GateConfig
    from components.errors import exit_on_error
    from components.evaluation.evaluator import run_evaluation
    from components.evaluation.report import REPORT_HTML

    with exit_on_error():
        result = run_evaluation(
            model.path,
            examples.path,
            blessing.path,
            GateConfig.from_dict(gate_config),
            serving_model_dir,
            model_name,
        )
        for name, value in result.metrics.items():
            metrics.log_metric(name, value)
        for baseline, values in result.baselines.items():
            for name, value in values.items():
                metrics.log_metric(f"{baseline}/{name}", value)
        shutil.copyfile(os.path.join(blessing.path, REPORT_HTML), report.path)
        blessing.metadata["blessed"] = result.blessed
        return result.blessed


def infra_validation_op(model: Input[Model], model_name: str, infra_blessing: Output[Artifact]):
    """Load the candidate as TF Serving does and in `mtrec serve`; replay its warmup requests."""
    from components.errors import exit_on_error
    from components.infra_validation.validator import run_infra_validation

    with exit_on_error():
        result = run_infra_validation(model.path, infra_blessing.path, model_name)
        infra_blessing.metadata["blessed"] = result["blessed"]


def push_op(
    model: Input[Model],
    blessing: Input[Artifact],
    infra_blessing: Input[Artifact],
    serving_model_dir: str,
    model_name: str,
    pushed_model: Output[Model],
):
    """Copy the blessed, infra-validated SavedModel to `<serving_model_dir>/<model_name>/<v>/`."""
    from components.errors import exit_on_error
    from components.push.pusher import push
    from components.storage import basename

    with exit_on_error():
        path = push(model.path, blessing.path, infra_blessing.path, serving_model_dir, model_name)
        pushed_model.uri = path
        pushed_model.metadata.update({"pushed_destination": path, "version": int(basename(path))})
