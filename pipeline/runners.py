"""Launchers for the one DAG: locally through kfp.local, or on a Kubeflow cluster (a run now, or a
recurring run on a cron schedule)."""

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

from components import features as F
from components import storage
from components.artifacts.model_versions import latest_version_path
from components.config import KubeflowConfig, PipelineConfig
from components.errors import MtrecError
from pipeline.dag import create_pipeline
from pipeline.display import StageRouter

log = logging.getLogger(__name__)

STAGES = ["ingestion", "preprocessing", "training", "evaluation", "infra-validation", "push"]
REFIT_STAGE = "refit"  # only with --refit-on-all, between evaluation and infra-validation
LOG_DIR = "logs"  # under the output folder: one file per task
# TensorFlow's C++ start-up notices in every task (the logs are kept anyway). Not
# TF_ENABLE_ONEDNN_OPTS=0, which silences one more line but makes training ~1.5x slower.
QUIET_ENVIRONMENT = {"TF_CPP_MIN_LOG_LEVEL": "2"}


def pipeline_arguments(config: PipelineConfig) -> dict:
    """The pipeline parameters for a configuration."""
    return {
        "data_dir": config.data_dir,
        "ingestion_config": config.ingestion.to_dict(),
        "serving_model_dir": config.serving_model_dir,
        "model_name": config.model_name,
        "preprocessing_config": config.preprocessing.to_dict(),
        "training_config": config.training.to_dict(),
        "gate_config": config.gates.to_dict(),
        "refit_on_all": config.refit_on_all,
    }


@dataclass
class LocalRun:
    output_dir: str
    blessed: bool
    model_path: str | None
    metrics: dict
    blessing: dict
    report_md: str
    seconds: float
    timings: dict[str, float]
    log_dir: str


def _absolute(path: str) -> str:
    return path if not path or storage.is_remote(path) else os.path.abspath(path)


def run_local(config: PipelineConfig, verbose: bool = False) -> LocalRun:
    """Run the whole DAG with kfp.local's SubprocessRunner in this environment.

    Artifacts live under `<output>/pipeline-root`; blessed models are pushed to
    `config.serving_model_dir` (default `<output>/serving`); the report, metrics and movie
    catalogue are copied to `<output>/` for people and `mtrec query`; each task's log goes to
    `<output>/logs/<stage>.log`.
    """
    from kfp import local

    output_dir = os.path.abspath(config.output_dir)
    config = dataclasses.replace(
        config,
        data_dir=_absolute(config.data_dir),
        ingestion=config.ingestion.replace(
            interactions=_absolute(config.ingestion.interactions),
            items=_absolute(config.ingestion.items),
        ),
        serving_model_dir=_absolute(config.serving_model_dir)
        or os.path.join(output_dir, "serving"),
    )
    os.makedirs(output_dir, exist_ok=True)
    log_dir = os.path.join(output_dir, LOG_DIR)
    shutil.rmtree(log_dir, ignore_errors=True)
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=os.path.join(output_dir, "pipeline-root"),
        raise_on_error=False,
    )
    before = latest_version_path(config.serving_model_dir, config.model_name)
    started = time.perf_counter()
    stages = list(STAGES)
    if config.refit_on_all:
        stages.insert(stages.index("infra-validation"), REFIT_STAGE)
    router = StageRouter(log_dir, stages, verbose=verbose, aliases={"training-op-2": REFIT_STAGE})
    # Retries and platform settings are for the cluster: locally a failure is reported at once.
    pipeline = create_pipeline(KubeflowConfig(retries=0))
    with router, contextlib.redirect_stdout(router), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*no effect in the current local runner")
        task = pipeline(**pipeline_arguments(config))
    seconds = time.perf_counter() - started
    for line in router.errors:
        print(line, file=sys.stderr)
    outputs = getattr(task, "outputs", None) or {}
    if "blessing" not in outputs:
        failed = [s.name for s in router.stages.values() if s.state == "failed"]
        where = router.log_path(failed[0]) if failed else log_dir
        raise MtrecError(
            f"the pipeline failed in {', '.join(failed) or 'a task'} before evaluation finished "
            f"(its log: {where})"
        )
    blessing_dir = outputs["blessing"].path
    for name in os.listdir(blessing_dir):
        if name.endswith((".md", ".png", ".json", ".html")):
            shutil.copyfile(os.path.join(blessing_dir, name), os.path.join(output_dir, name))
    shutil.copyfile(
        os.path.join(outputs["movies"].path, F.MOVIES_FILE), os.path.join(output_dir, F.MOVIES_FILE)
    )
    with open(os.path.join(blessing_dir, F.BLESSING_FILE), encoding="utf-8") as handle:
        blessing = json.load(handle)
    with open(os.path.join(blessing_dir, F.METRICS_FILE), encoding="utf-8") as handle:
        metrics = json.load(handle)
    after = latest_version_path(config.serving_model_dir, config.model_name)
    model_path = after if after != before else None
    if blessing["blessed"] and model_path is None:
        failed = [s.name for s in router.stages.values() if s.state == "failed"]
        where = router.log_path(failed[0]) if failed else log_dir
        raise MtrecError(
            "the model was blessed but nothing was pushed: "
            f"{', '.join(failed) or 'a task'} failed (its log: {where})"
        )
    return LocalRun(
        output_dir,
        bool(blessing["blessed"]),
        model_path,
        metrics,
        blessing,
        os.path.join(output_dir, "report.md"),
        seconds,
        router.timings(),
        log_dir,
    )


def _client(host: str, namespace: str | None):
    import kfp

    with _api_errors(host):
        return kfp.Client(host=host, namespace=namespace)


@contextlib.contextmanager
def _api_errors(host: str):
    """A refused connection or an API error of the KFP endpoint: one line, not a traceback."""
    try:
        yield
    except MtrecError:
        raise
    except Exception as err:  # kfp raises urllib3, kfp_server_api and requests errors alike
        reason = getattr(err, "reason", None) or str(err)
        first = str(reason).strip().splitlines()[0] if str(reason).strip() else type(err).__name__
        raise MtrecError(
            f"cannot reach the Kubeflow Pipelines API at {host}: {type(err).__name__}: {first[:200]}"
        ) from None


def submit(
    host: str,
    config: PipelineConfig,
    settings: KubeflowConfig,
    experiment: str | None = None,
    run_name: str | None = None,
    namespace: str | None = None,
    pipeline_root: str | None = None,
) -> str:
    """Submit a run to a Kubeflow Pipelines endpoint; returns the run id."""
    client = _client(host, namespace)
    with _api_errors(host):
        result = client.create_run_from_pipeline_func(
            create_pipeline(settings),
            arguments=pipeline_arguments(config),
            experiment_name=experiment,
            run_name=run_name,
            pipeline_root=pipeline_root or None,
            enable_caching=settings.enable_caching,
        )
    return result.run_id


def schedule(
    host: str,
    config: PipelineConfig,
    settings: KubeflowConfig,
    cron: str,
    job_name: str,
    experiment: str = "mtrec",
    namespace: str | None = None,
    pipeline_root: str | None = None,
) -> str:
    """Create a recurring run (KFP cron: six fields, seconds first); returns its id."""
    from pipeline.dag import compile_pipeline

    client = _client(host, namespace)
    with _api_errors(host), tempfile.TemporaryDirectory() as workdir:
        experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
        package = compile_pipeline(os.path.join(workdir, "pipeline.yaml"), settings)
        job = client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=job_name,
            cron_expression=cron,
            params=pipeline_arguments(config),
            pipeline_package_path=package,
            pipeline_root=pipeline_root or None,
            enable_caching=settings.enable_caching,
        )
    return job.recurring_run_id
