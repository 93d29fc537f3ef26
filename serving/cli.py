"""`mtrec serve` and `mtrec query`: arguments and entry points.

Imports of TensorFlow and gRPC stubs happen inside the entry points, so building the parser
(and `mtrec --help`) stays fast.
"""

import argparse
import logging
import signal
import sys
import threading

log = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-base-path",
        required=True,
        help="export base folder: serves <base>/<model-name>/<highest integer version>/",
    )
    parser.add_argument("--model-name", default="mtrec", help="default: %(default)s")
    parser.add_argument(
        "--host", default="0.0.0.0", help="interface to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (default: %(default)s)")
    parser.add_argument(
        "--rest-port",
        type=int,
        default=0,
        help="TF Serving REST API port, e.g. 8501 (default: 0, off)",
    )
    parser.add_argument(
        "--poll-seconds",
        type=float,
        default=2.0,
        help="how often to look for a new version (0: never; default: %(default)s)",
    )
    parser.add_argument(
        "--keep-versions",
        type=int,
        default=1,
        help="versions kept loaded, newest first, for requests pinning model_spec.version "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="gRPC handler threads (default: 0 = 8 per core, 8 to 32)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=4096,
        help="largest batch a request may send (0: no limit; default: %(default)s)",
    )
    parser.add_argument(
        "--batching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="merge concurrent requests to a signature into one model call (default: on)",
    )
    parser.add_argument(
        "--inter-op-threads",
        type=int,
        default=1,
        help="TensorFlow inter-op threads (default: %(default)s: lowest latency for these small "
        "graphs; 0 = TensorFlow's default)",
    )
    parser.add_argument(
        "--intra-op-threads",
        type=int,
        default=0,
        help="TensorFlow intra-op threads (default: 0 = TensorFlow's default)",
    )
    parser.add_argument(
        "--grace-seconds",
        type=float,
        default=5.0,
        help="time in-flight requests get at shutdown (default: %(default)s)",
    )


def configure_tensorflow_threads(inter_op: int, intra_op: int) -> None:
    """Must run before TensorFlow executes anything; later it is logged and ignored."""
    import tensorflow as tf

    try:
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
    except RuntimeError as error:
        log.warning("TensorFlow thread settings ignored (%s)", error)


def serve_main(args: argparse.Namespace) -> int:
    """Run the server until SIGTERM or Ctrl-C, then drain and exit 0."""
    configure_tensorflow_threads(args.inter_op_threads, args.intra_op_threads)
    from serving.server import ModelServer, ServerConfig

    config = ServerConfig(
        model_base_path=args.model_base_path,
        model_name=args.model_name,
        host=args.host,
        port=args.port,
        rest_port=args.rest_port,
        poll_seconds=args.poll_seconds,
        keep_versions=args.keep_versions,
        workers=args.workers,
        max_batch_size=args.max_batch_size,
        grace_seconds=args.grace_seconds,
        batching=args.batching,
    )
    server = ModelServer(config).start()
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.wait(stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", default="localhost:8500", help="gRPC host:port (default: %(default)s)"
    )
    parser.add_argument("--model-name", default="mtrec", help="default: %(default)s")
    parser.add_argument("--user-id", type=int, required=True)
    parser.add_argument("-k", "--top-k", type=int, default=10, help="default: %(default)s")
    parser.add_argument(
        "--movies",
        help="movie catalogue for titles: movies.tsv or a folder holding it (e.g. the "
        "`mtrec run` output folder); without it, movie ids only",
    )
    parser.add_argument(
        "--include-seen",
        action="store_true",
        help="also recommend movies the user already rated (the seed's behaviour)",
    )
    parser.add_argument(
        "--by-rating",
        action="store_true",
        help="order the retrieved movies by predicted stars (retrieve, then rank)",
    )
    parser.add_argument("--version", type=int, help="pin a model version (default: the latest)")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds per call (default: %(default)s)"
    )


def query_main(args: argparse.Namespace) -> int:
    """Print the user's top-k titles with predicted stars. Errors raise `ServingClientError`
    (an MtrecError: one line on stderr, exit status 2 from `mtrec`)."""
    from serving.client import RecommenderClient, format_recommendations, load_titles

    titles = load_titles(args.movies) if args.movies else {}
    with RecommenderClient(
        args.target, args.model_name, version=args.version, timeout=args.timeout, titles=titles
    ) as client:
        recommendations = client.recommend(
            args.user_id, k=args.top_k, include_seen=args.include_seen, by_rating=args.by_rating
        )
    print(format_recommendations(args.user_id, recommendations, args.include_seen))
    if not args.movies:
        print("(pass --movies to show titles)", file=sys.stderr)
    return 0
