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


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerConfig field (e.g. max_batch_size -> --max-batch-size); the dataclass
    holds defaults and help, `ServerConfig.problems()` the checks."""
    from serving.config import config_fields

    for field in config_fields():
        default = field.default
        help_text = field.metadata.get("help", "")
        if isinstance(default, bool):
            parser.add_argument(
                _flag(field.name),
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{help_text} (default: {'on' if default else 'off'})",
            )
            continue
        kind = type(default)
        parser.add_argument(
            _flag(field.name),
            type=kind,
            default=default,
            metavar={int: "N", float: "SECONDS"}.get(kind, "TEXT"),
            help=f"{help_text} (default: %(default)s)" if default != "" else help_text,
        )


def config_from_args(args: argparse.Namespace):
    from serving.config import ServerConfig, config_fields

    return ServerConfig(**{field.name: getattr(args, field.name) for field in config_fields()})


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
    """Run the server until SIGTERM or Ctrl-C, then drain and exit 0. A setting or start-up
    problem the user can fix prints one `mtrec serve: error: ...` line and exits 2."""
    from components.errors import MtrecError

    try:
        config = config_from_args(args).check()
    except MtrecError as error:
        print(f"mtrec serve: error: {error}", file=sys.stderr)
        return 2
    return run_server(config)


def run_server(config, stop: threading.Event | None = None, companion: bool = False) -> int:
    """Start, serve until `stop` (or SIGTERM / Ctrl-C), drain. Exit status 0; 2 for a start-up
    problem (one `mtrec serve: error:` line); 1 when a companion gRPC process died."""
    import shutil

    from components.errors import MtrecError
    from serving.processes import prepare_group

    group = prepare_group(config)  # before serving.server imports prometheus-client
    try:
        try:
            configure_tensorflow_threads(config.inter_op_threads, config.intra_op_threads)
            from serving.server import ModelServer

            server = ModelServer(config, companion=companion).start()
        except MtrecError as error:
            print(f"mtrec serve: error: {error}", file=sys.stderr)
            return 2
        stop = stop or threading.Event()

        def on_signal(signum, _frame) -> None:
            log.info("received %s", signal.Signals(signum).name)
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            server.wait(stop)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 1 if server.failure else 0
    finally:
        if group:  # this process made the group's folder (companions are stopped by now)
            shutil.rmtree(group, ignore_errors=True)


def add_query_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target", default="localhost:8500", help="gRPC host:port (default: %(default)s)"
    )
    parser.add_argument("--model-name", default="mtrec", help="default: %(default)s")
    parser.add_argument(
        "--user-id",
        required=True,
        help="the user's raw id, as in the data (sent as the model declares it: int or string)",
    )
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
