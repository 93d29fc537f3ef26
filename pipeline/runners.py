"""Launchers for the one DAG: locally through kfp.local, or on a Kubeflow cluster."""

import dataclasses
import glob
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass

from components import features as F
from components.config import DEFAULT_IMAGE, PipelineConfig
from components.errors import MtrecError
from components.layout import latest_version_path
from pipeline.dag import create_pipeline

log = logging.getLogger(__name__)


def pipeline_arguments(config: PipelineConfig, serving_model_dir: str) -> dict:
    """The pipeline parameters for a configuration."""
    return {
        "data_dir": config.data_dir,
        "serving_model_dir": serving_model_dir,
        "model_name": config.model_name,
        "preprocessing_config": config.preprocessing.to_dict(),
        "training_config": config.training.to_dict(),
        "gate_config": config.gates.to_dict(),
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


def run_local(config: PipelineConfig) -> LocalRun:
    """Run the whole DAG with kfp.local's SubprocessRunner in this environment.

    Artifacts live under `<output>/pipeline-root`; the export goes to `<output>/serving`; the
    report, metrics and movie catalogue are copied to `<output>/` for people and `mtrec query`.
    """
    from kfp import local

    output_dir = os.path.abspath(config.output_dir)
    if config.data_dir:
        config = dataclasses.replace(config, data_dir=os.path.abspath(config.data_dir))
    serving_dir = os.path.join(output_dir, "serving")
    os.makedirs(serving_dir, exist_ok=True)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=os.path.join(output_dir, "pipeline-root"),
        raise_on_error=False,
    )
    before = latest_version_path(serving_dir, config.model_name)
    started = time.perf_counter()
    task = create_pipeline(DEFAULT_IMAGE)(**pipeline_arguments(config, serving_dir))
    seconds = time.perf_counter() - started
    outputs = getattr(task, "outputs", None) or {}
    if "blessing" not in outputs:
        raise MtrecError(
            "the pipeline failed before evaluation finished: the failing task's "
            "'mtrec: error:' line above says why"
        )
    blessing_dir = outputs["blessing"].path
    for name in os.listdir(blessing_dir):
        if name.endswith((".md", ".png", ".json", ".html")):
            shutil.copyfile(os.path.join(blessing_dir, name), os.path.join(output_dir, name))
    shutil.copyfile(
        os.path.join(outputs["movies"].path, F.MOVIES_FILE), os.path.join(output_dir, F.MOVIES_FILE)
    )
    with open(os.path.join(blessing_dir, "blessing.json"), encoding="utf-8") as handle:
        blessing = json.load(handle)
    with open(os.path.join(blessing_dir, "metrics.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)
    after = latest_version_path(serving_dir, config.model_name)
    model_path = after if after != before else None
    if blessing["blessed"] and model_path is None:
        raise MtrecError("the model was blessed but the export task did not write a new version")
    return LocalRun(
        output_dir,
        bool(blessing["blessed"]),
        model_path,
        metrics,
        blessing,
        os.path.join(output_dir, "report.md"),
        seconds,
    )


def latest_pipeline_root_run(output_dir: str) -> str | None:
    runs = sorted(glob.glob(os.path.join(output_dir, "pipeline-root", "*")), key=os.path.getmtime)
    return runs[-1] if runs else None


def submit(
    host: str,
    config: PipelineConfig,
    serving_model_dir: str,
    image: str = DEFAULT_IMAGE,
    experiment: str | None = None,
    run_name: str | None = None,
    namespace: str | None = None,
) -> str:
    """Submit a run to a Kubeflow Pipelines endpoint; returns the run id."""
    import kfp

    client = kfp.Client(host=host, namespace=namespace)
    result = client.create_run_from_pipeline_func(
        create_pipeline(image),
        arguments=pipeline_arguments(config, serving_model_dir),
        experiment_name=experiment,
        run_name=run_name,
    )
    return result.run_id
