"""The KFP v2 DAG: ingestion -> preprocessing -> training -> evaluation -> (if blessed) export.

One factory builds the pipeline for both launchers: `kfp.local` (the `mtrec run` command) and a
Kubeflow cluster (`mtrec compile` / `mtrec submit`). The stage logic lives in `components/`; each
stage's KFP function is wrapped here with the component image built from the repo's Dockerfile,
so nothing is pip-installed at run time in the cluster.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Metrics

from components.config import (
    DEFAULT_IMAGE,
    DEFAULT_SERVING_MODEL_DIR,
    DEFAULT_TRAINING,
    GateConfig,
    PreprocessingConfig,
)
from components.evaluation import evaluation_op
from components.export import export_op
from components.ingestion import ingestion_op
from components.preprocessing import preprocessing_op
from components.training import training_op

PIPELINE_NAME = "mtrec"
# Pipeline parameter defaults (module-level: KFP reads them from the signature).
_PREPROCESSING_DEFAULTS = PreprocessingConfig().to_dict()
_TRAINING_DEFAULTS = DEFAULT_TRAINING.to_dict()
_GATE_DEFAULTS = GateConfig().to_dict()
TASK_NAMES = ("ingestion", "preprocessing", "training", "evaluation", "export")


class PipelineOutputs(NamedTuple):
    metrics: Metrics
    report: HTML
    blessing: Artifact
    movies: Dataset


def create_pipeline(
    image: str = DEFAULT_IMAGE,
    training_cpu: str = "4",
    training_memory: str = "16G",
    gpu_type: str = "nvidia.com/gpu",
    gpu_limit: int = 1,
):
    """Build the pipeline function for a component image and the training task's resources."""

    def component(func):
        return dsl.component(func, base_image=image, install_kfp_package=False)

    ingestion = component(ingestion_op)
    preprocessing = component(preprocessing_op)
    training = component(training_op)
    evaluation = component(evaluation_op)
    export = component(export_op)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="MovieLens multi-task recommender: ingest, Beam preprocess, train, evaluate "
        "with gates, export a blessed model for TF Serving.",
    )
    def mtrec_pipeline(
        data_dir: str = "",
        serving_model_dir: str = DEFAULT_SERVING_MODEL_DIR,
        model_name: str = "mtrec",
        preprocessing_config: dict = _PREPROCESSING_DEFAULTS,
        training_config: dict = _TRAINING_DEFAULTS,
        gate_config: dict = _GATE_DEFAULTS,
    ) -> PipelineOutputs:
        ingest = ingestion(data_dir=data_dir).set_display_name("ingestion")
        prepare = preprocessing(
            ratings=ingest.outputs["ratings"], preprocessing_config=preprocessing_config
        ).set_display_name("preprocessing")
        train = training(
            examples=prepare.outputs["examples"], training_config=training_config
        ).set_display_name("training")
        train.set_cpu_limit(training_cpu).set_memory_limit(training_memory)
        if gpu_limit:
            train.set_accelerator_type(gpu_type).set_accelerator_limit(gpu_limit)
        evaluate = evaluation(
            model=train.outputs["model"],
            examples=prepare.outputs["examples"],
            gate_config=gate_config,
            serving_model_dir=serving_model_dir,
            model_name=model_name,
        ).set_display_name("evaluation")
        # The blessing is the evaluation's return value, `Output` (kfp.local resolves only that
        # name in conditions).
        with dsl.If(evaluate.outputs["Output"] == True, name="model-is-blessed"):  # noqa: E712
            export(
                model=train.outputs["model"],
                examples=prepare.outputs["examples"],
                blessing=evaluate.outputs["blessing"],
                serving_model_dir=serving_model_dir,
                model_name=model_name,
            ).set_display_name("export")
        return PipelineOutputs(
            metrics=evaluate.outputs["metrics"],
            report=evaluate.outputs["report"],
            blessing=evaluate.outputs["blessing"],
            movies=ingest.outputs["movies"],
        )

    return mtrec_pipeline


def compile_pipeline(path: str, image: str = DEFAULT_IMAGE) -> str:
    """Write the KFP IR YAML for Kubeflow."""
    from kfp import compiler

    compiler.Compiler().compile(create_pipeline(image), package_path=path)
    return path
