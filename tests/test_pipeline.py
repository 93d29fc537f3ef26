import dataclasses
import json
import os

import pytest
import tensorflow as tf
import yaml

from components import features as F
from components.artifacts.model_versions import list_versions
from components.config import (
    SEED_TRAINING,
    ConfigError,
    GateConfig,
    KubeflowConfig,
    PipelineConfig,
    PreprocessingConfig,
    TrainingConfig,
)
from pipeline import cli
from pipeline.dag import compile_pipeline

STAGES = ["ingestion", "preprocessing", "training", "evaluation", "infra-validation", "push"]
CLUSTER = KubeflowConfig(
    image="registry.example/mtrec:test",
    pvcs=("models-pvc=/mnt/models", "data-pvc=/data"),
    secrets=("s3-credentials",),
)


def _compile(tmp_path_factory, settings):
    path = str(tmp_path_factory.mktemp("yaml") / "pipeline.yaml")
    compile_pipeline(path, settings)
    with open(path) as handle:
        return list(yaml.safe_load_all(handle))


@pytest.fixture(scope="module")
def compiled_documents(tmp_path_factory):
    return _compile(tmp_path_factory, CLUSTER)


@pytest.fixture(scope="module")
def compiled(compiled_documents):
    return compiled_documents[0]


def _all_tasks(spec):
    tasks = dict(spec["root"]["dag"]["tasks"])
    for name, component in spec["components"].items():
        tasks.update(
            {f"{name}/{k}": v for k, v in component.get("dag", {}).get("tasks", {}).items()}
        )
    return tasks


def test_compiled_yaml_has_the_six_stages(compiled):
    names = {task["taskInfo"]["name"] for task in _all_tasks(compiled).values()}
    assert set(STAGES) <= names


def test_storage_tasks_mount_volumes_use_secrets_and_retry(compiled, compiled_documents):
    platform = compiled_documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    # push-op-2 is the push of the refit branch (--refit-on-all).
    storage_tasks = {"exec-ingestion-op", "exec-evaluation-op", "exec-push-op", "exec-push-op-2"}
    assert set(platform) == storage_tasks
    for name in storage_tasks:
        mounts = {(m["mountPath"], m["constant"]) for m in platform[name]["pvcMount"]}
        assert mounts == {("/mnt/models", "models-pvc"), ("/data", "data-pvc")}
        (secret,) = platform[name]["secretAsEnv"]
        assert secret["secretName"] == "s3-credentials"
        assert {k["envVar"] for k in secret["keyToEnv"]} == {
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"
        }  # fmt: skip
    tasks = {t["taskInfo"]["name"]: t for t in _all_tasks(compiled).values()}
    for name in ("ingestion", "evaluation", "push"):
        assert tasks[name]["retryPolicy"]["maxRetryCount"] == 2
    assert "retryPolicy" not in tasks["training"]
    # No credential values in the YAML: only the secret's name.
    assert "testing" not in yaml.safe_dump(compiled_documents)


def test_no_cache_turns_caching_off_for_every_task(tmp_path_factory, compiled):
    def container_tasks(spec):
        return [
            task for task in _all_tasks(spec).values()
            if "executorLabel" in spec["components"][task["componentRef"]["name"]]
        ]  # fmt: skip

    assert len(container_tasks(compiled)) == 9  # 6 stages + the refit branch's three
    assert all(t.get("cachingOptions", {}).get("enableCache") for t in container_tasks(compiled))
    (uncached, *_) = _compile(tmp_path_factory, CLUSTER.replace(enable_caching=False))
    for task in container_tasks(uncached):
        assert not task.get("cachingOptions", {}).get("enableCache")


def test_training_requests_a_gpu_and_resources(compiled):
    executors = compiled["deploymentSpec"]["executors"]
    training = executors["exec-training-op"]["container"]
    assert training["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert training["resources"]["accelerator"]["resourceCount"] == "1"
    assert training["resources"]["cpuLimit"] == 4.0
    assert training["image"] == "registry.example/mtrec:test"
    # The image holds the project: nothing is pip-installed at run time.
    for executor in executors.values():
        assert "pip install" not in " ".join(executor["container"]["command"])


def _inner(spec, component):
    return spec["components"][component]["dag"]["tasks"]


def test_infra_validation_and_push_run_only_when_blessed(compiled):
    tasks = _all_tasks(compiled)
    blessed = next(t for t in tasks.values() if t["taskInfo"]["name"] == "model-is-blessed")
    assert "evaluation-op-Output" in blessed["triggerPolicy"]["condition"]
    assert "evaluation-op" in blessed["dependentTasks"]
    (branches,) = _inner(compiled, blessed["componentRef"]["name"]).values()
    evaluated, refit = _inner(compiled, branches["componentRef"]["name"]).values()
    assert "refit_on_all'] == false" in evaluated["triggerPolicy"]["condition"]
    # Without --refit-on-all the pusher copies the artifact training wrote: the one evaluation
    # scored.
    inner = _inner(compiled, evaluated["componentRef"]["name"])
    assert sorted(t["taskInfo"]["name"] for t in inner.values()) == ["infra-validation", "push"]
    push = next(t for t in inner.values() if t["taskInfo"]["name"] == "push")
    assert push["dependentTasks"] == ["infra-validation-op"]
    model = push["inputs"]["artifacts"]["model"]["componentInputArtifact"]
    assert model == "pipelinechannel--training-op-model"
    # With it, the refit's model is validated and pushed.
    inner = _inner(compiled, refit["componentRef"]["name"])
    assert sorted(t["taskInfo"]["name"] for t in inner.values()) == [
        "infra-validation", "push", "refit"
    ]  # fmt: skip
    push = next(t for t in inner.values() if t["taskInfo"]["name"] == "push")
    assert push["inputs"]["artifacts"]["model"]["taskOutputArtifact"]["producerTask"] == (
        "training-op-2"
    )


def test_pipeline_parameters_default_to_the_config(compiled):
    params = compiled["root"]["inputDefinitions"]["parameters"]
    assert params["training_config"]["defaultValue"]["epochs"] == TrainingConfig().epochs
    assert params["gate_config"]["defaultValue"]["max_rmse"] == GateConfig().max_rmse
    assert params["preprocessing_config"]["defaultValue"]["split_seed"] == 42


def test_every_cli_flag_maps_to_the_config():
    parser = cli.build_parser()
    args = parser.parse_args(
        [
            "run", "--data-dir", "d", "--output", "o", "--preset", "seed", "--epochs", "7",
            "--rating-hidden-units", "32,16", "--use-bias-terms", "true", "--test-fraction", "0.1",
            "--max-rmse", "0.3", "--require-beat-baselines", "no", "--serving-model-dir", "s3://b/m",
        ]
    )  # fmt: skip
    config = cli.config_from_args(args)
    assert config == PipelineConfig(
        data_dir="d",
        output_dir="o",
        serving_model_dir="s3://b/m",
        preprocessing=PreprocessingConfig(test_fraction=0.1),
        training=SEED_TRAINING.replace(epochs=7, rating_hidden_units=(32, 16), use_bias_terms=True),
        gates=GateConfig(max_rmse=0.3, require_beat_baselines=False),
    )
    flags = {a.dest for a in parser._subparsers._group_actions[0].choices["run"]._actions}
    for section, cls in cli.SECTIONS.items():
        for name in cls.__dataclass_fields__:
            assert f"{section}.{name}" in flags


def test_the_large_preset_trains_lazily_without_weight_averaging():
    """The settings bench/scale.py trains with at ML-25M's shape: no step may touch whole tables."""
    args = cli.build_parser().parse_args(["train", "--examples", "e", "--output", "o",
                                          "--preset", "large", "--epochs", "1"])  # fmt: skip
    training = cli.config_from_args(args).training
    assert training.lazy_embedding_updates and training.ema_momentum == 0.0
    assert (training.batch_size, training.retrieval_negatives) == (1024, "in-batch")
    assert training.epochs == 1 and training.rating_heads == 1


def test_kubeflow_flags_map_to_their_config():
    parser = cli.build_parser()
    args = parser.parse_args(
        ["compile", "--pvc", "a=/x", "--pvc", "b=/y", "--secret", "s=K1,K2", "--no-cache",
         "--image", "i:1", "--retries", "0"]
    )  # fmt: skip
    settings = cli.kubeflow_from_args(args)
    assert settings == KubeflowConfig(
        image="i:1", pvcs=("a=/x", "b=/y"), secrets=("s=K1,K2",), enable_caching=False, retries=0
    )
    assert settings.secret_envs() == [("s", {"K1": "K1", "K2": "K2"})]
    with pytest.raises(ConfigError, match="pvc must be NAME=/mount/path"):
        cli.kubeflow_from_args(parser.parse_args(["compile", "--pvc", "nopath"]))
    for command in ("submit", "schedule"):
        flags = {a.dest for a in parser._subparsers._group_actions[0].choices[command]._actions}
        assert {"kubeflow.pvcs", "kubeflow.secrets", "training.epochs", "gates.max_rmse"} <= flags


@pytest.mark.parametrize("version", ["0", "-1", "99999999999999999999", "x"])
def test_push_version_flag_is_checked(version, capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(
            ["push", "--model", "m", "--blessing", "b", "--infra-blessing", "i",
             "--serving-model-dir", "s", "--version", version]
        )  # fmt: skip
    assert "expected an integer in 1..9223372036854775807" in capsys.readouterr().err


def test_config_round_trips_and_rejects_bad_values():
    assert TrainingConfig.from_dict(SEED_TRAINING.to_dict()) == SEED_TRAINING
    with pytest.raises(ConfigError, match="unknown field"):
        TrainingConfig.from_dict({"epoch": 3})
    with pytest.raises(ConfigError, match="TrainingConfig.epochs: expected int"):
        TrainingConfig.from_dict({"epochs": 2.5})
    with pytest.raises(ConfigError, match="test_fraction"):
        PreprocessingConfig(test_fraction=1.5).validate()


def test_cli_errors_are_one_line_not_tracebacks(tmp_path, capsys):
    code = cli.main(
        ["ingest", "--data-dir", str(tmp_path / "nope"), "--ratings-output", str(tmp_path / "r"),
         "--movies-output", str(tmp_path / "m")]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("mtrec: error: ") and "nope: not found" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", [["submit"], ["schedule", "--cron", "0 0 3 * * *"]])
def test_an_unreachable_kubeflow_endpoint_is_one_line(command, capsys):
    from tests.conftest import free_port

    code = cli.main([command[0], "--host", f"http://127.0.0.1:{free_port()}", *command[1:]])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("mtrec: error: cannot reach the Kubeflow Pipelines API")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_compile(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert cli.main(["compile", "--output", str(out)]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out


def test_a_failing_task_reports_its_error_without_a_traceback(tmp_path, capfd):
    from components.errors import MtrecError
    from pipeline.runners import run_local

    config = PipelineConfig(data_dir=str(tmp_path / "missing"), output_dir=str(tmp_path / "out"))
    with pytest.raises(MtrecError, match="the pipeline failed in ingestion before evaluation"):
        run_local(config)
    printed = capfd.readouterr()
    output = printed.out + printed.err
    assert "mtrec: error: " in output and "missing: not found" in output
    assert "Traceback" not in output
    with open(tmp_path / "out" / "logs" / "ingestion.log") as handle:
        assert "missing: not found" in handle.read()


PERMISSIVE = GateConfig(max_rmse=1.0, min_hit_rate=0.0, require_beat_baselines=False)


@pytest.fixture(scope="module")
def blessed_run(tmp_path_factory, small_data_dir):
    """One blessed local run with the final refit, shared by the tests that check what a run
    pushes (the refit is what a blessed run pushes with --refit-on-all)."""
    from pipeline.runners import run_local

    config = PipelineConfig(
        data_dir=small_data_dir,
        output_dir=str(tmp_path_factory.mktemp("blessed") / "out"),
        refit_on_all=True,
        training=TrainingConfig(epochs=2, batch_size=256),
        gates=PERMISSIVE.replace(max_regression_rmse=1.0, max_regression_hit_rate=1.0),
    )
    return config, run_local(config)


@pytest.mark.slow
def test_local_run_pushes_when_blessed_and_a_failing_gate_blocks_the_push(blessed_run):
    from pipeline.runners import run_local

    config, first = blessed_run
    out = config.output_dir
    assert first.blessed
    assert first.model_path == os.path.join(out, "serving", "mtrec", "1")
    assert [s for s in first.timings if s != "refit"] == STAGES
    loaded = tf.saved_model.load(first.model_path)
    result = loaded.signatures[F.SIGNATURE_RETRIEVE](user_id=tf.constant([1, 2], tf.int64))
    assert result[F.OUT_MOVIE_IDS].shape == (2, 10)
    for name in ("report.md", "report.html", "metrics.json", "blessing.json", "movies.tsv"):
        assert os.path.isfile(os.path.join(out, name)), name
    for stage in STAGES:
        assert os.path.isfile(os.path.join(out, "logs", f"{stage}.log")), stage

    blocked = dataclasses.replace(
        config, gates=PERMISSIVE.replace(min_hit_rate=1.0), refit_on_all=False
    )
    second = run_local(blocked)
    assert not second.blessed and second.model_path is None
    assert list_versions(os.path.join(out, "serving", "mtrec")) == [1]
    gates = {g["name"]: g["passed"] for g in second.blessing["gates"]}
    assert gates["hit@10"] is False
    assert "hit@10 vs blessed v1" in gates  # compared with the model the first run pushed


@pytest.mark.slow
def test_the_compiled_yaml_itself_runs_through_kfp_local(tmp_path, small_data_dir):
    """What is submitted is what was run: the YAML file, loaded back, through kfp.local."""
    from kfp import components, local

    from pipeline.runners import pipeline_arguments

    path = str(tmp_path / "pipeline.yaml")
    compile_pipeline(path, KubeflowConfig(retries=0))
    pipeline = components.load_component_from_file(path)
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "root"),
        raise_on_error=True,
    )
    serving = str(tmp_path / "serving")
    config = PipelineConfig(
        data_dir=small_data_dir,
        serving_model_dir=serving,
        training=TrainingConfig(epochs=1, batch_size=256),
        gates=GateConfig(max_rmse=1.0, min_hit_rate=0.0, require_beat_baselines=False),
    )
    task = pipeline(**pipeline_arguments(config))
    with open(os.path.join(task.outputs["blessing"].path, "blessing.json")) as handle:
        assert json.load(handle)["blessed"] is True
    assert list_versions(os.path.join(serving, "mtrec")) == [1]


@pytest.mark.slow
def test_a_half_star_release_runs_end_to_end_on_its_own_scale(tmp_path):
    """ml-25m's layout (CSV, half stars): normalised and reported on the data's own range."""
    from pipeline.runners import run_local
    from tests.conftest import write_movielens

    data = write_movielens(str(tmp_path / "ml-25m"), layout="ml-25m")
    config = PipelineConfig(
        data_dir=data,
        output_dir=str(tmp_path / "out"),
        training=TrainingConfig(epochs=1, batch_size=256),
        gates=GateConfig(max_rmse=1.0, min_hit_rate=0.0, require_beat_baselines=False),
    )
    result = run_local(config)
    with open(tmp_path / "out" / "pipeline-root" / _stats_path(tmp_path / "out")) as handle:
        low, high = json.load(handle)["stars_range"]
    assert low == 0.5 or low < 1.0
    model = result.metrics["model"]
    assert model["rmse_stars"] == pytest.approx(model["rmse"] * (high - low))
    loaded = tf.saved_model.load(result.model_path)
    out = loaded.signatures[F.SIGNATURE_RANK](
        user_id=tf.constant([1, 2], tf.int64), movie_id=tf.constant([1, 2], tf.int64)
    )
    np_stars = out[F.OUT_STARS].numpy()
    assert ((np_stars >= low - 1e-6) & (np_stars <= high + 1e-6)).all()


def _stats_path(output) -> str:
    (path,) = [
        os.path.relpath(os.path.join(root, name), output / "pipeline-root")
        for root, _, names in os.walk(output / "pipeline-root")
        for name in names
        if name == "stats.json"
    ]
    return path


@pytest.mark.slow
def test_refit_on_all_pushes_the_final_fit_and_keeps_the_blessing(blessed_run):
    from components.artifacts.saved_model import read_metadata

    _, result = blessed_run
    assert result.blessed and result.model_path.endswith("/mtrec/1")
    assert read_metadata(result.model_path)["fit_splits"] == list(F.SPLITS)
    assert "refit" in result.timings and "infra-validation" in result.timings
    evaluated = result.blessing["metrics"]
    assert evaluated == result.metrics["model"]  # the blessing keeps the evaluated figures
