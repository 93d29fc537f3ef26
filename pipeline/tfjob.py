"""Multi-worker training on Kubeflow: the TFJob (Kubeflow Training Operator v1) that the
training task launches when `KubeflowConfig.training_workers` > 1.

The manifest is built when the pipeline is compiled, so the YAML holds it (image, Worker
replicas, resources, volumes, credentials); the training task fills in the run's fields (job
name, the examples and model locations, the training settings), creates the job with the
maintained `kubeflow-training` SDK, waits for it, and copies the chief's SavedModel into its
Model artifact. Every replica runs `python -m components.training.distributed` with the
TF_CONFIG the operator gives it (components/training/distributed.py).

Staging: KFP's artifact store (often MinIO behind the KFP launcher) is not something the
workers can write to, so the task copies the examples to `training_staging/<job>/examples`
(shared storage: s3://, gs:// or a ReadWriteMany PVC), the chief writes
`training_staging/<job>/model`, and the task removes `training_staging/<job>` afterwards.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from typing import Any

from components.config import KubeflowConfig
from components.training.launcher import WORKER_MODULE

log = logging.getLogger(__name__)

API_VERSION = "kubeflow.org/v1"
KIND = "TFJob"
CONTAINER = "tensorflow"  # the container name the operator injects TF_CONFIG into
REPLICA_TYPE = "Worker"  # worker 0 is the chief (TF's convention without a Chief replica)

# Filled in by the training task (fill_manifest); kept verbatim in the compiled YAML.
EXAMPLES, MODEL, CONFIG, NAME = "{examples}", "{model}", "{training_config}", "{model_name}"
POLL_SECONDS = 15


def tfjob_manifest(settings: KubeflowConfig) -> dict[str, Any]:
    """The TFJob of `settings.training_workers` Worker replicas, as a plain dict (the run's
    fields are placeholders)."""
    from kubeflow.training import ApiClient, models
    from kubernetes import client as k8s

    limits = {"cpu": settings.training_cpu, "memory": settings.training_memory}
    if settings.gpu_limit:
        limits[settings.gpu_type] = str(settings.gpu_limit)
    env = [
        k8s.V1EnvVar(
            name=env_name,
            value_from=k8s.V1EnvVarSource(
                secret_key_ref=k8s.V1SecretKeySelector(name=secret, key=key)
            ),
        )
        for secret, keys in settings.secret_envs()
        for key, env_name in keys.items()
    ]
    mounts = [
        k8s.V1VolumeMount(name=f"pvc-{i}", mount_path=path)
        for i, (_, path) in enumerate(settings.volume_mounts())
    ]
    volumes = [
        k8s.V1Volume(
            name=f"pvc-{i}",
            persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=name),
        )
        for i, (name, _) in enumerate(settings.volume_mounts())
    ]
    container = k8s.V1Container(
        name=CONTAINER,
        image=settings.image,
        command=["python", "-m", WORKER_MODULE],
        args=[
            "--examples",
            EXAMPLES,
            "--model",
            MODEL,
            "--training-config",
            CONFIG,
            "--model-name",
            NAME,
        ],  # fmt: skip
        resources=k8s.V1ResourceRequirements(limits=limits, requests=dict(limits)),
        env=env or None,
        volume_mounts=mounts or None,
    )
    job = models.KubeflowOrgV1TFJob(
        api_version=API_VERSION,
        kind=KIND,
        metadata=k8s.V1ObjectMeta(name="mtrec-training"),
        spec=models.KubeflowOrgV1TFJobSpec(
            run_policy=models.KubeflowOrgV1RunPolicy(
                clean_pod_policy="Running",
                backoff_limit=0,
                active_deadline_seconds=settings.tfjob_timeout_seconds,
            ),  # fmt: skip
            tf_replica_specs={
                REPLICA_TYPE: models.KubeflowOrgV1ReplicaSpec(
                    replicas=settings.training_workers,
                    # A lost worker fails the job (the task reports it): a restarted worker
                    # would rejoin a collective whose peers have moved on.
                    restart_policy="Never",
                    template=k8s.V1PodTemplateSpec(
                        spec=k8s.V1PodSpec(containers=[container], volumes=volumes or None)
                    ),
                )
            },
        ),
    )
    return ApiClient().sanitize_for_serialization(job)


def job_name(run_id: str, refit: bool = False) -> str:
    """A DNS-1123 name for the run's TFJob (63 characters at most)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")[:40] or "run"
    return f"mtrec-{'refit' if refit else 'train'}-{slug}".rstrip("-")


def fill_manifest(
    manifest: dict[str, Any],
    name: str,
    examples: str,
    model: str,
    training_config: dict[str, Any],
    model_name: str,
    refit_on_all: bool = False,
) -> dict[str, Any]:
    """The compiled manifest with the run's fields in place (and its integers restored: KFP
    passes a dict parameter as a protobuf Struct, whose numbers come back as floats, which the
    Kubernetes API refuses for fields such as `replicas`)."""
    job = _integers(copy.deepcopy(manifest))
    job["metadata"]["name"] = name
    spec = job["spec"]["tfReplicaSpecs"][REPLICA_TYPE]
    workers = int(spec["replicas"])
    values = {
        EXAMPLES: examples,
        MODEL: model,
        CONFIG: json.dumps({**training_config, "workers": workers}),
        NAME: model_name,
    }
    for container in spec["template"]["spec"]["containers"]:
        container["args"] = [values.get(arg, arg) for arg in container["args"]]
        if refit_on_all:
            container["args"].append("--refit-on-all")
    return job


def _integers(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _integers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integers(item) for item in value]
    return value


def run_tfjob(job: dict[str, Any], namespace: str | None = None, timeout: int = 24 * 3600) -> None:
    """Create the TFJob, wait until it succeeds, delete it; a failed or timed-out job raises a
    TrainingError naming it and its last condition."""
    from kubeflow.training import TrainingClient

    from components.errors import TrainingError

    name = job["metadata"]["name"]
    client = TrainingClient(job_kind=KIND, **({"namespace": namespace} if namespace else {}))
    client.create_job(job=job, namespace=namespace)
    try:
        client.wait_for_job_conditions(
            name, namespace=namespace, job_kind=KIND, wait_timeout=timeout,
            polling_interval=POLL_SECONDS,
        )  # fmt: skip
    except (RuntimeError, TimeoutError) as error:
        raise TrainingError(f"TFJob {name}: {error}") from None
    finally:
        try:
            client.delete_job(name, namespace=namespace, job_kind=KIND)
        except Exception as error:  # the job's outcome matters more than its clean-up
            log.warning("could not delete TFJob %s: %s", name, error)
