import os

import pytest
import tensorflow as tf
import yaml

from components import features as F
from components.config import (
    SEED_TRAINING,
    ConfigError,
    GateConfig,
    PipelineConfig,
    PreprocessingConfig,
    TrainingConfig,
)
from components.layout import list_versions
from pipeline import cli
from pipeline.dag import compile_pipeline


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("yaml") / "pipeline.yaml")
    compile_pipeline(path, image="registry.example/mtrec:test")
    with open(path) as handle:
        return yaml.safe_load(handle)


def _all_tasks(spec):
    tasks = dict(spec["root"]["dag"]["tasks"])
    for name, component in spec["components"].items():
        tasks.update(
            {f"{name}/{k}": v for k, v in component.get("dag", {}).get("tasks", {}).items()}
        )
    return tasks


def test_compiled_yaml_has_the_five_stages(compiled):
    names = {task["taskInfo"]["name"] for task in _all_tasks(compiled).values()}
    assert {"ingestion", "preprocessing", "training", "evaluation", "export"} <= names


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


def test_export_runs_only_when_blessed(compiled):
    tasks = _all_tasks(compiled)
    condition = next(t for t in tasks.values() if "triggerPolicy" in t)
    assert "evaluation-op-Output" in condition["triggerPolicy"]["condition"]
    assert "evaluation-op" in condition["dependentTasks"]
    inner = compiled["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert [t["taskInfo"]["name"] for t in inner.values()] == ["export"]


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
            "--max-rmse", "0.3", "--require-beat-baselines", "no",
        ]
    )  # fmt: skip
    config = cli.config_from_args(args)
    assert config == PipelineConfig(
        data_dir="d",
        output_dir="o",
        preprocessing=PreprocessingConfig(test_fraction=0.1),
        training=SEED_TRAINING.replace(epochs=7, rating_hidden_units=(32, 16), use_bias_terms=True),
        gates=GateConfig(max_rmse=0.3, require_beat_baselines=False),
    )
    flags = {a.dest for a in parser._subparsers._group_actions[0].choices["run"]._actions}
    for section, cls in cli.SECTIONS.items():
        for name in cls.__dataclass_fields__:
            assert f"{section}.{name}" in flags


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
    assert err.startswith("mtrec: error: ") and "u.data: not found" in err
    assert "Traceback" not in err


def test_cli_compile(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert cli.main(["compile", "--output", str(out)]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out


def test_a_failing_task_reports_its_error_without_a_traceback(tmp_path, capfd):
    from components.errors import MtrecError
    from pipeline.runners import run_local

    config = PipelineConfig(data_dir=str(tmp_path / "missing"), output_dir=str(tmp_path / "out"))
    with pytest.raises(MtrecError, match="the pipeline failed before evaluation finished"):
        run_local(config)
    printed = capfd.readouterr()
    output = printed.out + printed.err
    assert "mtrec: error: " in output and "u.data: not found" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_local_run_exports_when_blessed_and_a_failing_gate_blocks_export(tmp_path, small_data_dir):
    from pipeline.runners import run_local

    permissive = GateConfig(max_rmse=1.0, min_hit_rate=0.0, require_beat_baselines=False)
    config = PipelineConfig(
        data_dir=small_data_dir,
        output_dir=str(tmp_path / "out"),
        training=TrainingConfig(epochs=2, batch_size=256),
        gates=permissive.replace(max_regression_rmse=1.0, max_regression_hit_rate=1.0),
    )
    first = run_local(config)
    assert first.blessed
    assert first.model_path == str(tmp_path / "out" / "serving" / "mtrec" / "1")
    loaded = tf.saved_model.load(first.model_path)
    out = loaded.signatures[F.SIGNATURE_RETRIEVE](user_id=tf.constant([1, 2], tf.int32))
    assert out[F.OUT_MOVIE_IDS].shape == (2, 10)
    for name in ("report.md", "report.html", "metrics.json", "blessing.json", "movies.tsv"):
        assert os.path.isfile(tmp_path / "out" / name), name

    blocked = config.__class__(**{**config.__dict__, "gates": permissive.replace(min_hit_rate=1.0)})
    second = run_local(blocked)
    assert not second.blessed and second.model_path is None
    assert list_versions(str(tmp_path / "out" / "serving" / "mtrec")) == [1]
    gates = {g["name"]: g["passed"] for g in second.blessing["gates"]}
    assert gates["hit@10"] is False
    assert "hit@10 vs blessed v1" in gates  # compared with the model the first run exported
