"""The server, REST and the client driven by each signature's declared input dtype: raw string
ids (DT_STRING), 64-bit integer ids (DT_INT64), bool and string outputs, a model without a
`rank` signature, and a graph's InvalidArgumentError as INVALID_ARGUMENT with its message.

The models are tiny SavedModels built here (tf.Module + tf.function signatures), independent of
the pipeline's export: the server must not assume int32 ids."""

from __future__ import annotations

import argparse
import http.client
import json
import os

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from components import features as F
from components.errors import MtrecError
from serving.cli import add_query_arguments, add_serve_arguments, query_main, serve_main
from serving.client import RecommenderClient, format_recommendations, load_titles
from serving.server import ModelServer, ServerConfig
from serving.signatures import describe_tf_error
from serving.tensors import InputSpec, decode_tensor
from tests.conftest import rss_bytes

MB = 1024 * 1024
STRING_USERS = ["alice", "bob"]
STRING_MOVIES = ["m-1", "m-2", "m-3"]
INT64_USERS = [10**12, 7]  # beyond int32
INT64_MOVIES = [5 * 10**11, 2, 3]
AFFINITY = [[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]
POPULAR = [[1.0, 0.5, 0.2]]  # what a cold-start user gets


class TinyRecommender(tf.Module):
    """Two users, three movies, top-2 retrieval with a cold-start fallback; ids of `dtype`."""

    def __init__(self, dtype: tf.DType, users: list, movies: list):
        super().__init__()
        self.dtype = dtype
        self.users = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(users, dtype), tf.range(len(users), dtype=tf.int64)
            ),
            -1,
        )
        self.movies = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(
                tf.constant(movies, dtype), tf.range(len(movies), dtype=tf.int64)
            ),
            -1,
        )
        self.movie_ids = tf.Variable(tf.constant(movies, dtype), trainable=False)
        self.affinity = tf.Variable(AFFINITY)

    def retrieve(self, user_id, excluded=None):
        rows = self.users.lookup(user_id)
        cold = rows < 0
        scores = tf.gather(self.affinity, tf.maximum(rows, 0))
        scores = tf.where(cold[:, None], tf.constant(POPULAR), scores)
        if excluded is not None:
            hit = tf.reduce_any(excluded[:, :, None] == self.movie_ids[None, None, :], axis=1)
            scores = tf.where(hit, tf.constant(-np.inf), scores)
        top = tf.math.top_k(scores, 2)
        return {
            F.OUT_MOVIE_IDS: tf.gather(self.movie_ids, top.indices),
            F.OUT_SCORES: top.values,
            "cold_start": cold,
        }

    def rank(self, user_id, movie_id):
        """An unknown movie id is an InvalidArgumentError raised in the graph (an assertion)."""
        users = tf.maximum(self.users.lookup(user_id), 0)
        movies = self.movies.lookup(movie_id)
        known = tf.debugging.assert_non_negative(movies, message="unknown movie_id")
        with tf.control_dependencies([known]):
            rating = tf.gather_nd(self.affinity, tf.stack([users, movies], axis=1)) / 3.0
        return {F.OUT_RATING: rating, F.OUT_STARS: 1.0 + 4.0 * rating}

    def rank_gather(self, user_id, movie_id):
        """An unknown movie id fails a kernel (gather out of range), not an assertion."""
        users = tf.maximum(self.users.lookup(user_id), 0)
        movies = self.movies.lookup(movie_id)
        rating = tf.gather(tf.gather(self.affinity, users), movies, batch_dims=1) / 3.0
        return {F.OUT_RATING: rating, F.OUT_STARS: 1.0 + 4.0 * rating}


def save_tiny(path: str, dtype: tf.DType, users: list, movies: list, with_rank: bool) -> None:
    module = TinyRecommender(dtype, users, movies)
    ids = tf.TensorSpec([None], dtype, name=F.USER_ID)
    retrieve = tf.function(lambda user_id: module.retrieve(user_id), input_signature=[ids])
    excluding = tf.function(
        lambda user_id, excluded_movie_ids: module.retrieve(user_id, excluded_movie_ids),
        input_signature=[ids, tf.TensorSpec([None, None], dtype, name=F.EXCLUDED_MOVIE_IDS)],
    )
    signatures = {
        F.SIGNATURE_RETRIEVE: retrieve.get_concrete_function(),
        F.SIGNATURE_RETRIEVE_EXCLUDING: excluding.get_concrete_function(),
    }
    if with_rank:
        pair = [ids, tf.TensorSpec([None], dtype, name=F.MOVIE_ID)]
        for name, method in ((F.SIGNATURE_RANK, module.rank), ("rank_gather", module.rank_gather)):
            function = tf.function(
                lambda user_id, movie_id, method=method: method(user_id, movie_id),
                input_signature=pair,
            )
            signatures[name] = function.get_concrete_function()
    tf.saved_model.save(module, path, signatures=signatures)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, str]:
    """Two export bases: `strings` (string ids, with rank) and `int64` (int64 ids, no rank,
    as an implicit-feedback model); each holds <name>/1/."""
    root = tmp_path_factory.mktemp("dtype-exports")
    made = {}
    for name, dtype, users, movies, with_rank in (
        ("strings", tf.string, STRING_USERS, STRING_MOVIES, True),
        ("int64", tf.int64, INT64_USERS, INT64_MOVIES, False),
    ):
        save_tiny(str(root / name / name / "1"), dtype, users, movies, with_rank)
        made[name] = str(root / name)
    return made


def start(base: str, name: str, **overrides) -> ModelServer:
    settings = {"host": "127.0.0.1", "port": 0, "rest_port": -1, "poll_seconds": 0}
    settings.update(overrides)
    return ModelServer(ServerConfig(base, name, **settings)).start()


@pytest.fixture(scope="module")
def strings(bases):
    server = start(bases["strings"], "strings", max_string_bytes=64)
    yield server
    server.stop(grace=0)


@pytest.fixture(scope="module")
def int64(bases):
    server = start(bases["int64"], "int64")
    yield server
    server.stop(grace=0)


def stub_for(server) -> prediction_service_pb2_grpc.PredictionServiceStub:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


def request(model: str, signature: str, **inputs) -> predict_pb2.PredictRequest:
    message = predict_pb2.PredictRequest()
    message.model_spec.name = model
    message.model_spec.signature_name = signature
    for name, value in inputs.items():
        proto = value if isinstance(value, tensor_pb2.TensorProto) else tf.make_tensor_proto(value)
        message.inputs[name].CopyFrom(proto)
    return message


def refused(stub, message) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(message, timeout=10)
    return caught.value


def rest(server, path: str, body: dict) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.rest_port, timeout=10)
    try:
        connection.request("POST", path, json.dumps(body), {"content-type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


# --- gRPC ---


def test_string_ids_over_grpc_equal_the_saved_model(strings, bases):
    stub = stub_for(strings)
    users = np.asarray([b"bob", b"alice", b"nobody"], object)
    reply = stub.Predict(request("strings", "", user_id=users), timeout=10)
    outputs = {name: tf.make_ndarray(proto) for name, proto in reply.outputs.items()}
    assert reply.outputs[F.OUT_MOVIE_IDS].dtype == types_pb2.DT_STRING
    assert reply.outputs["cold_start"].dtype == types_pb2.DT_BOOL
    expected = tf.saved_model.load(os.path.join(bases["strings"], "strings", "1")).signatures[
        F.SIGNATURE_RETRIEVE
    ](user_id=tf.constant(users.astype(bytes)))
    for name, tensor in expected.items():
        np.testing.assert_array_equal(outputs[name], tensor.numpy())
    assert outputs[F.OUT_MOVIE_IDS].tolist() == [
        [b"m-3", b"m-2"],
        [b"m-1", b"m-2"],
        [b"m-1", b"m-2"],
    ]
    assert outputs["cold_start"].tolist() == [False, False, True]

    excluded = np.asarray([[b"m-3", b""], [b"", b""]], object)
    reply = stub.Predict(
        request(
            "strings",
            F.SIGNATURE_RETRIEVE_EXCLUDING,
            user_id=users[:2],
            excluded_movie_ids=excluded,
        ),
        timeout=10,
    )
    got = tf.make_ndarray(reply.outputs[F.OUT_MOVIE_IDS]).tolist()
    assert got == [[b"m-2", b"m-1"], [b"m-1", b"m-2"]]


def test_int64_ids_over_grpc(int64):
    stub = stub_for(int64)
    reply = stub.Predict(
        request("int64", "", user_id=np.asarray([10**12, 99], np.int64)), timeout=10
    )
    movie_ids = tf.make_ndarray(reply.outputs[F.OUT_MOVIE_IDS])
    assert reply.outputs[F.OUT_MOVIE_IDS].dtype == types_pb2.DT_INT64
    assert movie_ids.tolist() == [[5 * 10**11, 2], [5 * 10**11, 2]]
    assert tf.make_ndarray(reply.outputs["cold_start"]).tolist() == [False, True]
    # Values one by one (int64_val) rather than tensor_content, last value repeated as TF does.
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_INT64, int64_val=[7])
    proto.tensor_shape.dim.add().size = 2
    reply = stub.Predict(request("int64", "", user_id=proto), timeout=10)
    assert tf.make_ndarray(reply.outputs["cold_start"]).tolist() == [False, False]


@pytest.mark.parametrize(
    "server_name, inputs, text",
    [
        ("strings", {"user_id": np.asarray([1], np.int32)}, "must be string, got int32"),
        ("int64", {"user_id": np.asarray([1], np.int32)}, "must be int64, got int32"),
        ("int64", {"user_id": np.asarray([b"7"], object)}, "must be int64, got string"),
    ],
)
def test_a_wrong_dtype_is_invalid_argument(strings, int64, server_name, inputs, text):
    server = {"strings": strings, "int64": int64}[server_name]
    error = refused(stub_for(server), request(server_name, "", **inputs))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and text in error.details()


def raw_strings(dims: list[int], values: list[bytes]) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=values)
    for size in dims:
        proto.tensor_shape.dim.add().size = size
    return proto


@pytest.mark.parametrize(
    "inputs, text",
    [
        ({"user_id": raw_strings([1], [b"x" * 65])}, "65 bytes exceeds this server's limit of 64"),
        ({"user_id": raw_strings([500_000_000], [b"alice"])}, "(--max-batch-size)"),
        ({"user_id": raw_strings([2], [b"a", b"b", b"c"])}, "3 values for shape [2]"),
        (
            {
                "user_id": raw_strings([1], [b"alice"]),
                "excluded_movie_ids": raw_strings([1, 100_000_000], [b"m-1"]),
            },
            "(--max-dim-size)",
        ),
        (
            {"user_id": tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_content=b"ab")},
            "string_val, not tensor_content",
        ),
    ],
)
def test_string_sizes_are_refused_before_decoding(strings, inputs, text):
    stub = stub_for(strings)
    signature = F.SIGNATURE_RETRIEVE_EXCLUDING if "excluded_movie_ids" in inputs else ""
    if "tensor_content" in text:
        inputs["user_id"].tensor_shape.dim.add().size = 1
    before = rss_bytes()
    error = refused(stub, request("strings", signature, **inputs))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and text in error.details()
    assert rss_bytes() - before < 100 * MB
    assert stub.Predict(request("strings", "", user_id=np.asarray([b"bob"], object)), timeout=10)


@pytest.mark.parametrize(
    "raw, expected",
    [
        (  # tf.debugging.Assert with data (the export's unknown-movie check)
            "assertion failed: [unknown movie_id (not in the model\\'s vocabulary):] [4242 7]"
            "\n\t [[{{function_node Assert_AssertGuard_false_7601}}{{node Assert/Assert}}]]",
            "unknown movie_id (not in the model's vocabulary): [4242 7]",
        ),
        (  # tf.debugging.assert_* on an input: its values
            "assertion failed: [k must be in 1..100] [Condition x >= y did not hold] "
            "[x (k:0) = ] [0] [y (Const:0) = ] [1]\n\t [[{{node assert}}]]",
            "k must be in 1..100 (got 0)",
        ),
        (
            "indices[0] = 9 is not in [0, 3)\n\t [[{{node GatherV2}}]]",
            "indices[0] = 9 is not in [0, 3)",
        ),
    ],
)
def test_tf_errors_become_one_line_naming_the_values(raw, expected):
    error = tf.errors.InvalidArgumentError(None, None, raw)
    assert describe_tf_error(error, ["k"]) == expected


@pytest.mark.parametrize(
    "signature, text", [(F.SIGNATURE_RANK, "unknown movie_id"), ("rank_gather", "indices")]
)
def test_a_graph_error_on_an_unknown_id_is_invalid_argument(strings, signature, text):
    stub = stub_for(strings)
    users = np.asarray([b"alice", b"alice"], object)
    good = stub.Predict(
        request("strings", signature, user_id=users, movie_id=np.asarray([b"m-1", b"m-3"], object)),
        timeout=10,
    )
    np.testing.assert_allclose(tf.make_ndarray(good.outputs[F.OUT_RATING]), [1.0, 1 / 3])
    error = refused(
        stub,
        request("strings", signature, user_id=users, movie_id=np.asarray([b"m-1", b"zz"], object)),
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert text in error.details()


def test_decode_strings_equals_make_ndarray():
    spec = InputSpec("s", "x", types_pb2.DT_STRING, np.dtype(object), (None, None), True)
    for proto in (
        tf.make_tensor_proto(np.asarray([[b"a", b"bc"], [b"", b"d"]], object)),
        raw_strings([2, 2], [b"a", b"b"]),  # TF repeats the last value
        raw_strings([3, 0], []),
    ):
        decoded = decode_tensor(proto, spec, 4096, 4096, 16)
        expected = tf.make_ndarray(proto)
        assert decoded.dtype == object and decoded.shape == expected.shape
        assert decoded.tolist() == expected.tolist()


# --- REST ---


def test_rest_takes_and_returns_strings(strings):
    path = "/v1/models/strings:predict"
    status, body = rest(strings, path, {"inputs": {"user_id": ["bob", "nobody"]}})
    assert status == 200, body
    assert body["outputs"]["movie_ids"] == [["m-3", "m-2"], ["m-1", "m-2"]]
    assert body["outputs"]["cold_start"] == [False, True]
    status, body = rest(strings, path, {"instances": [{"user_id": {"b64": "Ym9i"}}]})
    assert status == 200 and body["predictions"][0]["movie_ids"] == ["m-3", "m-2"]
    status, body = rest(
        strings,
        path,
        {
            "signature_name": "retrieve_excluding",
            "inputs": {"user_id": ["bob"], "excluded_movie_ids": [["m-3"]]},
        },
    )
    assert status == 200 and body["outputs"]["movie_ids"] == [["m-2", "m-1"]]
    for bad, text in (
        ({"inputs": {"user_id": [5]}}, "must be string, got int"),
        ({"inputs": {"user_id": ["x" * 65]}}, "--max-string-bytes"),
        ({"inputs": {"user_id": [{"b64": "%%"}]}}, "invalid base64"),
        (
            {"signature_name": "rank", "inputs": {"user_id": ["bob"], "movie_id": ["zz"]}},
            "unknown movie_id",
        ),
    ):
        status, body = rest(strings, path, bad)
        assert status == 400 and text in body["error"], (bad, body)


def test_rest_takes_int64_ids_beyond_int32(int64):
    path = "/v1/models/int64:predict"
    status, body = rest(int64, path, {"instances": [10**12, 7]})
    assert status == 200, body
    assert [row["movie_ids"] for row in body["predictions"]] == [[5 * 10**11, 2], [3, 2]]
    status, body = rest(int64, path, {"instances": ["7"]})
    assert status == 400 and "must be int64, got string" in body["error"]
    status, body = rest(int64, path, {"instances": [2**63]})
    assert status == 400


# --- the client and mtrec query ---


def test_client_sends_ids_as_each_signature_declares(strings, int64):
    with RecommenderClient(f"127.0.0.1:{strings.port}", "strings") as client:
        retrieved = client.retrieve(["bob", "nobody"])
        assert retrieved.movie_ids.tolist() == [[b"m-3", b"m-2"], [b"m-1", b"m-2"]]
        assert retrieved.cold_start.tolist() == [False, True]
        excluded = client.retrieve(["bob"], [["m-3"]]).movie_ids.tolist()
        assert excluded == [[b"m-2", b"m-1"]]
        np.testing.assert_allclose(client.rank(["alice"], ["m-2"]).stars, [1 + 4 * 2 / 3])
        recommendations = client.recommend("alice", k=2)
        assert [r.movie_id for r in recommendations] == ["m-1", "m-2"]
        assert not any(r.cold_start for r in recommendations)
        cold = client.recommend("nobody", k=2)
        assert [(r.movie_id, r.cold_start) for r in cold] == [("m-1", True), ("m-2", True)]
        assert "unknown to the model (cold start)" in format_recommendations("nobody", cold, False)
        assert [round(r.stars, 3) for r in recommendations] == [5.0, round(1 + 8 / 3, 3)]
        with pytest.raises(MtrecError, match="unknown movie_id"):
            client.rank(["alice"], ["zz"])
    with RecommenderClient(f"127.0.0.1:{int64.port}", "int64") as client:
        assert client.retrieve(10**12).movie_ids.dtype == np.int64
        assert client.retrieve(["7"]).movie_ids.tolist() == [[3, 2]]  # decimal text parsed
        recommendations = client.recommend(7, k=2)  # no rank signature: no stars
        assert [(r.movie_id, r.stars) for r in recommendations] == [(3, None), (2, None)]
        with pytest.raises(MtrecError, match="no 'rank' signature"):
            client.recommend(7, by_rating=True)
        with pytest.raises(MtrecError, match="must be integers"):
            client.retrieve(["seven"])


def parse(add, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add(parser)
    return parser.parse_args(list(argv))


def test_query_with_string_ids_and_without_rank(strings, int64, tmp_path, capsys):
    movies = tmp_path / "movies.tsv"
    movies.write_text("m-1\tFirst (1995)\nm-2\tSecond (1996)\nm-3\tThird (1997)\n")
    assert load_titles(str(movies)) == {
        "m-1": "First (1995)",
        "m-2": "Second (1996)",
        "m-3": "Third (1997)",
    }
    target = f"127.0.0.1:{strings.port}"
    argv = ("--target", target, "--model-name", "strings", "--user-id", "bob", "-k", "2")
    assert query_main(parse(add_query_arguments, *argv, "--movies", str(movies))) == 0
    out = capsys.readouterr().out
    assert "Third (1997)" in out and "stars" in out and "(movie m-3)" in out
    target = f"127.0.0.1:{int64.port}"
    argv = ("--target", target, "--model-name", "int64", "--user-id", "7", "-k", "2")
    assert query_main(parse(add_query_arguments, *argv)) == 0
    out = capsys.readouterr().out
    assert "score" in out and "stars" not in out and "(movie 3)" in out


def test_max_string_bytes_flag_is_checked(capsys):
    assert (
        serve_main(parse(add_serve_arguments, "--model-base-path", "x", "--max-string-bytes", "0"))
        == 2
    )
    assert "--max-string-bytes must be >= 1, got 0" in capsys.readouterr().err
