"""Beam's DaskRunner on a real dask.distributed cluster (scheduler + 2 workers on loopback, the
`dask_cluster` fixture) gives preprocessing outputs identical to DirectRunner's: split counts,
vocabularies, the Examples of each split, dead letters and stats."""

import json
import os
import struct

import pytest
from apache_beam.options.pipeline_options import StandardOptions

from components import features as F
from components.beam_runners import DASK_RUNNER, pipeline_options, remove_sink_temp_dirs
from components.config import IngestionConfig, PreprocessingConfig
from components.ingestion.ingest import run_ingestion
from components.preprocessing.pipeline import run_preprocessing
from tests.conftest import write_interactions, write_movielens


@pytest.mark.parametrize(
    "runner, beam_args",
    [("DaskRunner", []), ("dask", []), ("DirectRunner", ["--runner=DaskRunner"])],
)
def test_dask_runner_is_resolved_to_its_class(runner, beam_args):
    options = pipeline_options(runner, [*beam_args, "--dask_client_address=tcp://127.0.0.1:1"])
    assert options.view_as(StandardOptions).runner == DASK_RUNNER
    assert pipeline_options("DirectRunner").view_as(StandardOptions).runner == "DirectRunner"


def test_several_flags_in_one_quoted_argument_are_split():
    options = pipeline_options(
        "DaskRunner", ["--dask_client_address=tcp://h:1 --dask_npartitions=4"]
    )
    pytest.importorskip("distributed")
    from apache_beam.runners.dask.dask_runner import DaskOptions

    dask = options.view_as(DaskOptions)
    assert (dask.address, dask.npartitions) == ("tcp://h:1", 4)


def test_sink_temp_dirs_are_removed_and_nothing_else(tmp_path):
    for name in ("beam-temp-stats-1/x", "vocabulary/beam-temp-users-2/y", "vocabulary/users.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("z")
    remove_sink_temp_dirs(str(tmp_path))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "vocabulary", "vocabulary/users.txt"
    ]  # fmt: skip


def _records(path: str) -> list[bytes]:
    """A TFRecord file's records (length, its CRC, data, the data's CRC), CRCs not checked."""
    with open(path, "rb") as handle:
        data = handle.read()
    out, at = [], 0
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        out.append(data[at + 12 : at + 12 + length])
        at += 12 + length + 4
    return out


def _outputs(out_dir: str) -> dict:
    """Everything preprocessing wrote, order-free where the runner may order differently."""
    files = sorted(
        os.path.relpath(os.path.join(root, name), out_dir)
        for root, _, names in os.walk(out_dir)
        for name in names
    )
    examples = {split: [] for split in F.SPLITS}
    dead: list[str] = []
    for name in files:
        path = os.path.join(out_dir, name)
        if name.endswith(".tfrecord"):
            examples[name.split("-")[0]] += _records(path)
        elif name.startswith(F.DEAD_LETTER_PREFIX):
            with open(path, encoding="utf-8") as handle:
                dead += handle.read().splitlines()
    with open(os.path.join(out_dir, F.STATS_FILE), encoding="utf-8") as handle:
        stats = json.load(handle)
    stats.pop("seconds")
    vocabularies = {}
    for name in ("users.txt", "movies.txt"):
        with open(os.path.join(out_dir, "vocabulary", name), encoding="utf-8") as handle:
            vocabularies[name] = handle.read()
    return {
        "other files": [n for n in files if not n.endswith(".tfrecord")],
        "examples": {split: sorted(records) for split, records in examples.items()},
        "dead letters": sorted(dead),
        "stats": stats,
        "vocabularies": vocabularies,
    }


def _malformed_movielens(directory: str) -> str:
    write_movielens(directory)
    with open(os.path.join(directory, "u.data"), "a", encoding="utf-8") as handle:
        handle.write("7\t3\t9\t874000000\n8\tx\t4\t874000001\n9\t2\t3\n")
    return directory


def _ingested(tmp_path, case: str) -> str:
    ratings, movies = str(tmp_path / "ratings"), str(tmp_path / "movies")
    if case == "interactions":
        path = write_interactions(str(tmp_path / "events.csv"))
        run_ingestion("", ratings, movies, IngestionConfig(interactions=path))
    else:
        run_ingestion(
            _malformed_movielens(str(tmp_path / "raw"))
            if case == "malformed"
            else write_movielens(str(tmp_path / "raw")),
            ratings,
            movies,
        )
    return ratings


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, config",
    [
        ("movielens", PreprocessingConfig()),
        ("malformed", PreprocessingConfig(split="last-k", last_k=2, max_invalid_share=0.01)),
        ("interactions", PreprocessingConfig(split="temporal", min_item_count=2)),
    ],
    ids=["random", "last-k-with-dead-letters", "temporal-string-ids"],
)
def test_dask_runner_writes_what_direct_runner_writes(tmp_path, dask_cluster, case, config):
    ratings = _ingested(tmp_path, case)
    direct, dask = str(tmp_path / "direct"), str(tmp_path / "dask")
    expected = run_preprocessing(ratings, direct, config.replace(runner="DirectRunner"))
    got = run_preprocessing(
        ratings,
        dask,
        config.replace(runner="DaskRunner"),
        [f"--dask_client_address={dask_cluster}"],
    )
    assert {k: v for k, v in got.items() if k != "seconds"} == {
        k: v for k, v in expected.items() if k != "seconds"
    }
    outputs = _outputs(dask)
    assert outputs == _outputs(direct)
    assert sum(map(len, outputs["examples"].values())) == sum(expected["rows"].values()) > 0
    if case == "malformed":
        assert expected["invalid_rows"] == len(outputs["dead letters"]) == 3
    if case == "interactions":
        assert expected["vocabulary"]["id_kinds"] == {"user": "string", "movie": "string"}
    assert not [n for n in os.listdir(dask) if n.startswith("beam-temp-") or n == ".writing"]


@pytest.mark.slow
def test_mtrec_preprocess_runs_on_dask_from_the_command_line(tmp_path, dask_cluster, capsys):
    from pipeline.cli import main

    ratings = _ingested(tmp_path, "movielens")
    out = str(tmp_path / "examples")
    argv = ["preprocess", "--ratings", ratings, "--output", out, "--runner", "DaskRunner"]
    assert main([*argv, "--beam-args", f"--dask_client_address={dask_cluster}"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert sum(stats["rows"].values()) == sum(len(v) for v in _outputs(out)["examples"].values())
    run_preprocessing(ratings, str(tmp_path / "direct"), PreprocessingConfig())
    assert _outputs(out) == _outputs(str(tmp_path / "direct"))
