"""Your own logs as a source: CSV or Parquet, any ids, explicit or implicit feedback."""

import json
import os

import pytest

from components.artifacts.examples import load_stats
from components.artifacts.vocabulary import INT64, STRING, load_vocabularies
from components.config import IngestionConfig, PreprocessingConfig
from components.errors import DataError
from components.ingestion.ingest import run_ingestion
from components.preprocessing.pipeline import run_preprocessing
from tests.conftest import write_interactions


def _ingest(tmp_path, config: IngestionConfig):
    ratings, movies = str(tmp_path / "ratings"), str(tmp_path / "movies")
    report = run_ingestion("", ratings, movies, config)
    return report, ratings, movies


def test_csv_with_string_ids_and_a_catalogue(tmp_path):
    path = write_interactions(str(tmp_path / "events.csv"), items_path=str(tmp_path / "items.csv"))
    config = IngestionConfig(interactions=path, items=str(tmp_path / "items.csv"))
    report, ratings, movies = _ingest(tmp_path, config)
    assert report.id_kinds == {"user": STRING, "movie": STRING} and report.explicit
    assert report.ratings_rows == 60 * 25
    with open(f"{movies}/movies.tsv", encoding="utf-8") as handle:
        titles = dict(line.rstrip("\n").split("\t") for line in handle)
    assert titles["sku/7919"] == "Item 1, a title"
    stats = run_preprocessing(ratings, str(tmp_path / "examples"), PreprocessingConfig())
    assert stats["vocabulary"]["id_kinds"] == {"user": STRING, "movie": STRING}
    vocab = load_vocabularies(str(tmp_path / "examples"), stats)
    assert vocab.users.lookup(["user-0001"])[0] > 0 and vocab.users.lookup(["nobody"])[0] == 0


def test_parquet_with_64_bit_integer_ids_and_no_ratings_is_implicit(tmp_path):
    path = write_interactions(
        str(tmp_path / "events.parquet"),
        user_ids=lambda u: u * 2**40,
        item_ids=lambda m: -m * 2**33,
        rating=False,
    )
    report, ratings, movies = _ingest(tmp_path, IngestionConfig(interactions=path))
    assert report.id_kinds == {"user": INT64, "movie": INT64}
    assert report.explicit is False
    with open(f"{movies}/movies.tsv", encoding="utf-8") as handle:
        titles = [line.split("\t")[0] for line in handle]
    assert str(-(2**33)) in titles  # without --items an item's id is its title
    stats = run_preprocessing(ratings, str(tmp_path / "examples"), PreprocessingConfig())
    assert stats["explicit"] is False
    vocab = load_vocabularies(str(tmp_path / "examples"), load_stats(str(tmp_path / "examples")))
    assert vocab.users.lookup([7 * 2**40])[0] > 0


def test_duplicate_rows_keep_the_newest(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(
        "user_id,item_id,rating,timestamp\na,x,1,10\nb,x,4,10\na,x,5,20\na,y,3,5\n",
        encoding="utf-8",
    )
    report, ratings, _ = _ingest(tmp_path, IngestionConfig(interactions=str(path)))
    assert report.duplicate_pairs == 1 and report.superseded_lines == [1]
    with open(f"{ratings}/ingestion.json") as handle:
        assert json.load(handle)["superseded_lines"] == [1]


@pytest.mark.parametrize(
    "body, message",
    [
        ("user_id,item_id,rating\na,x,1\n,y,2\n", r"events.csv, line 3: field user_id is empty"),
        ("user_id,item_id,rating\na,x,nan\n", r"line 2: field rating is not a number"),
        ("user_id,item_id,rating\na,x,1e999\n", r"line 2: field rating is not a finite number"),
        (
            "user_id,item_id,rating,timestamp\na,x,1,12.5\n",
            r"line 2: field timestamp is not an integer",
        ),
        ('user_id,item_id,rating\n"a\tb",x,1\n', r"line 2: field user_id contains a tab"),
        ("user_id,item_id,rating\na,x\n", r"line 2: expected 3 fields \(the header's\), got 2"),
        ("user,item_id,rating\na,x,1\n", r"no column 'user_id' \(columns: user, item_id, rating\)"),
        ("user_id,item_id,rating\n", r"no interaction rows"),
        ("user_id,item_id,user_id\na,x,b\n", r"column 'user_id' appears 2 times"),
        (b"user_id,item_id,rating\n\xff,x,1\n", r"line 2: not valid UTF-8"),
    ],
)
def test_bad_rows_name_the_file_line_and_field(tmp_path, body, message):
    path = tmp_path / "events.csv"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    with pytest.raises(DataError, match=message):
        _ingest(tmp_path, IngestionConfig(interactions=str(path)))
    assert not os.path.exists(tmp_path / "ratings")  # nothing half-written


def test_temporal_split_needs_timestamps(tmp_path):
    path = write_interactions(str(tmp_path / "events.csv"), timestamps=False)
    _, ratings, _ = _ingest(tmp_path, IngestionConfig(interactions=path))
    with pytest.raises(DataError, match="no timestamp column"):
        run_preprocessing(ratings, str(tmp_path / "ex"), PreprocessingConfig(split="temporal"))


def test_data_dir_and_interactions_are_exclusive(tmp_path, small_data_dir):
    with pytest.raises(DataError, match="either --data-dir"):
        run_ingestion(
            small_data_dir, str(tmp_path / "r"), str(tmp_path / "m"),
            IngestionConfig(interactions="x.csv"),
        )  # fmt: skip


@pytest.mark.slow
def test_string_ids_end_to_end_through_grpc_and_query(tmp_path, capsys):
    """`mtrec run --interactions` with string ids: the pushed SavedModel answers a string user
    id over gRPC with string item ids, an unknown user gets cold_start, and `mtrec query`
    prints titles."""
    import grpc
    import numpy as np
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from components import features as F
    from components.config import GateConfig, PipelineConfig, TrainingConfig
    from pipeline.cli import main
    from pipeline.runners import run_local
    from serving.config import ServerConfig
    from serving.server import ModelServer

    events = write_interactions(
        str(tmp_path / "events.csv"), items_path=str(tmp_path / "items.csv")
    )
    config = PipelineConfig(
        output_dir=str(tmp_path / "out"),
        ingestion=IngestionConfig(interactions=events, items=str(tmp_path / "items.csv")),
        training=TrainingConfig(epochs=2, batch_size=256),
        gates=GateConfig(max_rmse=1.0, min_hit_rate=0.0, require_beat_baselines=False),
    )
    result = run_local(config)
    assert result.blessed and result.model_path
    assert "reference" not in result.metrics  # the seed's ML-100k figures: not for this data
    server = ModelServer(
        ServerConfig(
            str(tmp_path / "out" / "serving"), "mtrec", host="127.0.0.1", port=0, rest_port=-1
        )
    ).start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            request = predict_pb2.PredictRequest()
            request.model_spec.name = "mtrec"
            request.inputs[F.USER_ID].CopyFrom(
                tf.make_tensor_proto(np.array([b"user-0005", b"nobody"]))
            )
            response = stub.Predict(request, timeout=30)
        movies = tf.make_ndarray(response.outputs[F.OUT_MOVIE_IDS])
        assert movies.shape == (2, 10)
        assert all(m.decode().startswith("sku/") for m in movies.ravel())
        assert tf.make_ndarray(response.outputs[F.OUT_COLD_START]).tolist() == [False, True]
        capsys.readouterr()
        code = main(
            ["query", "--target", f"127.0.0.1:{server.port}", "--user-id", "user-0005",
             "--movies", str(tmp_path / "out")]
        )  # fmt: skip
        assert code == 0
        assert (
            len([line for line in capsys.readouterr().out.splitlines() if "a title" in line]) == 10
        )
    finally:
        server.stop(grace=0)
