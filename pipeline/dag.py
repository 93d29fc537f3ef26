"""The KFP v2 DAG, as in TFX: ingestion -> preprocessing -> training -> evaluation -> (if blessed)
infra-validation -> push.

Training writes the serving SavedModel; evaluation scores that artifact, infra-validation loads
it as TF Serving does, and the pusher copies it: one artifact from training to serving. One
factory builds the pipeline for both launchers, `kfp.local` (`mtrec run`) and a Kubeflow cluster
(`mtrec compile` / `submit` / `schedule`); they differ only in platform settings
(`KubeflowConfig`: image, volumes, secrets, caching, retries), which kfp.local ignores.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Metrics

from components.config import (
    DEFAULT_SERVING_MODEL_DIR,
    DEFAULT_TRAINING,
    GateConfig,
    IngestionConfig,
    KubeflowConfig,
    PreprocessingConfig,
)
from components.features import DEFAULT_MODEL_NAME
from pipeline.tasks import (
    evaluation_op,
    infra_validation_op,
    ingestion_op,
    preprocessing_op,
    push_op,
    training_op,
    training_tfjob_op,
)

PIPELINE_NAME = "mtrec"
RETRY_BACKOFF = "30s"
# Pipeline parameter defaults (module-level: KFP reads them from the signature).
_INGESTION_DEFAULTS = IngestionConfig().to_dict()
_PREPROCESSING_DEFAULTS = PreprocessingConfig().to_dict()
_TRAINING_DEFAULTS = DEFAULT_TRAINING.to_dict()
_GATE_DEFAULTS = GateConfig().to_dict()


class PipelineOutputs(NamedTuple):
    metrics: Metrics
    report: HTML
    blessing: Artifact
    movies: Dataset


def _storage_task(task: dsl.PipelineTask, settings: KubeflowConfig) -> dsl.PipelineTask:
    """A task that reads data or reads/writes models: volumes, credentials, retries."""
    if settings.pvcs or settings.secrets:
        from kfp import kubernetes

        for name, path in settings.volume_mounts():
            kubernetes.mount_pvc(task, pvc_name=name, mount_path=path)
        for name, keys in settings.secret_envs():
            kubernetes.use_secret_as_env(task, secret_name=name, secret_key_to_env=keys)
    if settings.retries:
        task.set_retry(num_retries=settings.retries, backoff_duration=RETRY_BACKOFF)
    return task


def create_pipeline(settings: KubeflowConfig | None = None):
    """Build the pipeline function for a cluster's settings (defaults work with kfp.local)."""
    settings = settings or KubeflowConfig()

    def component(func):
        return dsl.component(func, base_image=settings.image, install_kfp_package=False)

    ingestion = component(ingestion_op)
    preprocessing = component(preprocessing_op)
    if settings.training_workers > 1:
        from pipeline.tfjob import tfjob_manifest

        manifest = tfjob_manifest(settings)
        tfjob_training = component(training_tfjob_op)

        def training(**kwargs):
            """The launching task: small, no GPU (the TFJob's workers have them)."""
            task = tfjob_training(
                **kwargs,
                tfjob=manifest,
                staging=settings.training_staging,
                task_id=dsl.PIPELINE_TASK_ID_PLACEHOLDER,
            )
            return _storage_task(task, settings)

    else:
        training = component(training_op)

    def limit_training(task: dsl.PipelineTask, gpu: bool = True) -> None:
        if settings.training_workers > 1:
            return
        task.set_cpu_limit(settings.training_cpu).set_memory_limit(settings.training_memory)
        if gpu and settings.gpu_limit:
            task.set_accelerator_type(settings.gpu_type).set_accelerator_limit(settings.gpu_limit)

    evaluation = component(evaluation_op)
    infra_validation = component(infra_validation_op)
    push = component(push_op)

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="MovieLens multi-task recommender: ingest, Beam preprocess, train a serving "
        "SavedModel, evaluate it with gates, infra-validate and push the blessed model.",
    )
    def mtrec_pipeline(
        data_dir: str = "",
        serving_model_dir: str = DEFAULT_SERVING_MODEL_DIR,
        model_name: str = DEFAULT_MODEL_NAME,
        ingestion_config: dict = _INGESTION_DEFAULTS,
        preprocessing_config: dict = _PREPROCESSING_DEFAULTS,
        training_config: dict = _TRAINING_DEFAULTS,
        gate_config: dict = _GATE_DEFAULTS,
        refit_on_all: bool = False,
    ) -> PipelineOutputs:
        ingest = ingestion(data_dir=data_dir, ingestion_config=ingestion_config)
        ingest.set_display_name("ingestion")
        _storage_task(ingest, settings)
        prepare = preprocessing(
            ratings=ingest.outputs["ratings"], preprocessing_config=preprocessing_config
        ).set_display_name("preprocessing")
        train = training(
            examples=prepare.outputs["examples"],
            training_config=training_config,
            model_name=model_name,
        ).set_display_name("training")
        limit_training(train)
        evaluate = evaluation(
            model=train.outputs["model"],
            examples=prepare.outputs["examples"],
            gate_config=gate_config,
            serving_model_dir=serving_model_dir,
            model_name=model_name,
        ).set_display_name("evaluation")
        _storage_task(evaluate, settings)
        # The blessing is the evaluation's return value, `Output` (kfp.local resolves only that
        # name in conditions).
        tasks = [ingest, prepare, train, evaluate]

        def validate_and_push(model):
            validate = infra_validation(model=model, model_name=model_name)
            validate.set_display_name("infra-validation")
            pushed = push(
                model=model,
                blessing=evaluate.outputs["blessing"],
                infra_blessing=validate.outputs["infra_blessing"],
                serving_model_dir=serving_model_dir,
                model_name=model_name,
            ).set_display_name("push")
            tasks.extend([validate, _storage_task(pushed, settings)])

        with dsl.If(evaluate.outputs["Output"] == True, name="model-is-blessed"):  # noqa: E712
            with dsl.If(refit_on_all == False, name="push-the-evaluated-model"):  # noqa: E712
                validate_and_push(train.outputs["model"])
            with dsl.Else(name="refit-on-all-splits"):
                # The final fit: same settings, every split; the blessing keeps the figures
                # of the model evaluation scored.
                refit = training(
                    examples=prepare.outputs["examples"],
                    training_config=training_config,
                    model_name=model_name,
                    refit_on_all=True,
                ).set_display_name("refit")
                limit_training(refit, gpu=False)
                tasks.append(refit)
                validate_and_push(refit.outputs["model"])
        if not settings.enable_caching:
            for task in tasks:
                task.set_caching_options(False)
        return PipelineOutputs(
            metrics=evaluate.outputs["metrics"],
            report=evaluate.outputs["report"],
            blessing=evaluate.outputs["blessing"],
            movies=ingest.outputs["movies"],
        )

    return mtrec_pipeline


def compile_pipeline(path: str, settings: KubeflowConfig | None = None) -> str:
    """Write the KFP IR YAML for Kubeflow."""
    from kfp import compiler

    compiler.Compiler().compile(create_pipeline(settings), package_path=path)
    return path
