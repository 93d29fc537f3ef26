"""Multi-worker training on Kubeflow: the TFJob in the compiled YAML (pipeline/tfjob.py)."""

import json

import pytest
import yaml

from components.config import ConfigError, KubeflowConfig
from pipeline import cli
from pipeline.dag import compile_pipeline
from pipeline.tfjob import fill_manifest, job_name, tfjob_manifest

CLUSTER = KubeflowConfig(
    image="registry.example/mtrec:test",
    pvcs=("models-pvc=/mnt/models",),
    secrets=("s3-credentials",),
    training_workers=2,
    training_staging="s3://bucket/mtrec-staging",
)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("yaml") / "pipeline.yaml")
    compile_pipeline(path, CLUSTER)
    with open(path) as handle:
        return list(yaml.safe_load_all(handle))


def _training_tasks(spec):
    found = {}
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    for name, task in tasks.items():
        if task["componentRef"]["name"].startswith("comp-training-tfjob-op"):
            found[name] = task
    return found


def test_the_compiled_yaml_holds_the_tfjob_for_training_and_refit(compiled):
    spec = compiled[0]
    tasks = _training_tasks(spec)
    assert set(tasks) == {"training-tfjob-op", "training-tfjob-op-2"}  # training and refit
    for task in tasks.values():
        job = task["inputs"]["parameters"]["tfjob"]["runtimeValue"]["constant"]
        assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "TFJob"
        worker = job["spec"]["tfReplicaSpecs"]["Worker"]
        assert worker["replicas"] == 2
        (container,) = worker["template"]["spec"]["containers"]
        assert container["name"] == "tensorflow"  # where the operator puts TF_CONFIG
        assert container["image"] == CLUSTER.image
        assert container["command"] == ["python", "-m", "components.training.distributed"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "s3-credentials"
        assert worker["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {
            "claimName": "models-pvc"
        }
        staging = task["inputs"]["parameters"]["staging"]["runtimeValue"]["constant"]
        assert staging == CLUSTER.training_staging


def test_the_launching_task_asks_for_no_gpu(compiled):
    executors = compiled[0]["deploymentSpec"]["executors"]
    launcher = executors["exec-training-tfjob-op"]["container"]
    assert "accelerator" not in launcher.get("resources", {})
    assert "exec-training-op" not in executors


def test_one_worker_compiles_no_tfjob(tmp_path):
    path = str(tmp_path / "p.yaml")
    compile_pipeline(path, KubeflowConfig())
    with open(path) as handle:
        text = handle.read()
    assert "TFJob" not in text and "training-tfjob-op" not in text


def test_the_filled_manifest_is_a_tfjob_the_sdk_reads(compiled):
    from kubeflow.training import ApiClient, models

    task = _training_tasks(compiled[0])["training-tfjob-op"]
    compiled_job = task["inputs"]["parameters"]["tfjob"]["runtimeValue"]["constant"]
    # As the task receives it: KFP's Struct parameters carry numbers as floats.
    as_received = json.loads(json.dumps(compiled_job), parse_float=float, parse_int=float)
    name = job_name("3f2a6c1e-RUN_id.x")
    job = fill_manifest(as_received, name, "s3://b/e", "s3://b/m", {"epochs": 2}, "movielens")
    assert job["spec"]["tfReplicaSpecs"]["Worker"]["replicas"] == 2
    assert isinstance(job["spec"]["runPolicy"]["backoffLimit"], int)
    args = job["spec"]["tfReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["args"]
    assert args[:4] == ["--examples", "s3://b/e", "--model", "s3://b/m"]
    assert json.loads(args[args.index("--training-config") + 1]) == {"epochs": 2, "workers": 2}

    class Response:  # the shape ApiClient.deserialize reads: a body with .data
        data = json.dumps(job)

    model = ApiClient().deserialize(Response(), "KubeflowOrgV1TFJob")
    assert isinstance(model, models.KubeflowOrgV1TFJob)
    assert model.metadata.name == name == "mtrec-train-3f2a6c1e-run-id-x"
    assert model.spec.tf_replica_specs["Worker"].replicas == 2


def test_several_workers_need_shared_staging():
    with pytest.raises(ConfigError, match="training_staging"):
        KubeflowConfig(training_workers=2).validate()
    KubeflowConfig(
        training_workers=2, pvcs=("p=/mnt/shared",), training_staging="/mnt/shared/x"
    ).validate()
    assert (
        tfjob_manifest(KubeflowConfig(training_workers=3, training_staging="gs://b/s"))["spec"][
            "tfReplicaSpecs"
        ]["Worker"]["replicas"]
        == 3
    )


def test_cli_compile_training_workers(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    argv = ["compile", "--output", str(out), "--training-workers", "2",
            "--training-staging", "gs://bucket/staging"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "kind: TFJob" in out.read_text()
    assert cli.main(["compile", "--output", str(out), "--training-workers", "2"]) == 2
    assert "mtrec: error: training_workers > 1 needs training_staging" in capsys.readouterr().err
