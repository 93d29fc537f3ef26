"""The `mtrec` command line: run the pipeline, run one stage, compile/submit, serve, query.

Every stage flag maps to a field of the typed configuration (`components.config`): the flags are
generated from the dataclasses, so the two cannot drift apart.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ start-up chatter out

from components.config import (
    DEFAULT_IMAGE,
    DEFAULT_SERVING_MODEL_DIR,
    TRAINING_PRESETS,
    GateConfig,
    PipelineConfig,
    PreprocessingConfig,
    TrainingConfig,
    training_preset,
)
from components.errors import MtrecError

SECTIONS: dict[str, type] = {
    "preprocessing": PreprocessingConfig,
    "training": TrainingConfig,
    "gates": GateConfig,
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _arg_type(field: dataclasses.Field):
    default = field.default
    if isinstance(default, bool):
        return _parse_bool, "BOOL"
    if isinstance(default, tuple):
        return _parse_ints, "N,N,..."
    if isinstance(default, int):
        return int, "N"
    if isinstance(default, float):
        return float, "X"
    return str, "TEXT"


def add_config_arguments(parser: argparse.ArgumentParser, sections=tuple(SECTIONS)) -> None:
    """One flag per config field (e.g. TrainingConfig.learning_rate -> --learning-rate)."""
    for section in sections:
        cls = SECTIONS[section]
        group = parser.add_argument_group(f"{section} ({cls.__name__})")
        for field in dataclasses.fields(cls):
            parse, metavar = _arg_type(field)
            group.add_argument(
                _flag(field.name),
                dest=f"{section}.{field.name}",
                type=parse,
                metavar=metavar,
                default=None,
                help=f"default: {field.default!r}",
            )
    if "training" in sections:
        parser.add_argument(
            "--preset",
            choices=sorted(TRAINING_PRESETS),
            default="default",
            help="training settings to start from: 'seed' is the seed notebook's model",
        )


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    values = vars(args)
    sections = {}
    for section, cls in SECTIONS.items():
        if section == "training":
            base = training_preset(values.get("preset") or "default")
        else:
            base = cls()
        changes = {
            field.name: values[f"{section}.{field.name}"]
            for field in dataclasses.fields(cls)
            if values.get(f"{section}.{field.name}") is not None
        }
        sections[section] = base.replace(**changes) if changes else base
    return PipelineConfig(
        data_dir=values.get("data_dir") or "",
        output_dir=values.get("output") or "mtrec-output",
        model_name=values.get("model_name") or "mtrec",
        **sections,
    )


# --- commands ---


def cmd_run(args: argparse.Namespace) -> int:
    from components.report import format_table
    from pipeline.runners import run_local

    config = config_from_args(args)
    result = run_local(config)
    print()
    print(format_table(_table_rows(result.metrics)))
    print()
    for gate in result.blessing["gates"]:
        verdict = "PASS" if gate["passed"] else "FAIL"
        print(
            f"gate {gate['name']:<28} {verdict}  {gate['value']:.4f} {gate['comparison']} {gate['threshold']:.4f}"
        )
    print()
    print(f"blessed:  {result.blessed}")
    print(f"model:    {result.model_path or '(not exported: the model is not blessed)'}")
    print(f"metrics:  {os.path.join(result.output_dir, 'metrics.json')}")
    print(f"report:   {result.report_md}")
    print(f"catalogue: {os.path.join(result.output_dir, 'movies.tsv')}")
    print(f"pipeline wall time: {result.seconds:.1f}s")
    return 0 if result.blessed or not args.require_blessed else 3


def _table_rows(metrics: dict) -> list[dict]:
    from components.evaluation import SEED_REFERENCE

    rows = [{"system": "model", **metrics["model"]}]
    rows += [{"system": f"baseline: {k}", **v} for k, v in metrics["baselines"].items()]
    if metrics.get("previous"):
        prev = metrics["previous"]
        rows.append({"system": f"previous blessed (v{prev['version']})", **prev["metrics"]})
    rows.append(dict(SEED_REFERENCE))
    return rows


def cmd_compile(args: argparse.Namespace) -> int:
    from pipeline.dag import compile_pipeline

    path = compile_pipeline(args.output, image=args.image)
    print(f"wrote {path}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.runners import submit

    config = config_from_args(args)
    run_id = submit(
        args.host,
        config,
        args.serving_model_dir,
        image=args.image,
        experiment=args.experiment,
        run_name=args.run_name,
        namespace=args.namespace,
    )
    print(f"submitted run {run_id} to {args.host}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from components.ingestion import run_ingestion

    report = run_ingestion(args.data_dir or "", args.ratings_output, args.movies_output)
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from components.preprocessing import run_preprocessing

    config = config_from_args(args)
    stats = run_preprocessing(args.ratings, args.output, config.preprocessing, args.beam_args)
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from components.training import run_training

    config = config_from_args(args)
    history = run_training(args.examples, args.output, config.training)
    print(json.dumps({k: v[-1] for k, v in history.items()}, indent=2, sort_keys=True))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from components.evaluation import run_evaluation
    from components.report import format_table

    config = config_from_args(args)
    result = run_evaluation(
        args.model,
        args.examples,
        args.output,
        config.gates,
        args.serving_model_dir or "",
        config.model_name,
    )
    print(format_table(result.table()))
    print(f"blessed: {result.blessed}  ({os.path.join(args.output, 'blessing.json')})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from components.export import run_export

    path = run_export(
        args.model,
        args.examples,
        args.blessing,
        args.serving_model_dir,
        args.model_name,
        args.version,
    )
    print(f"exported {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from components.report import format_table
    from pipeline.experiments import compare_variants

    rows = compare_variants(args.data_dir, args.output, args.epochs)
    print(format_table(rows))
    print(f"report: {os.path.join(args.output, 'report.md')}")
    return 0


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="mtrec", description="MovieLens multi-task recommender pipeline (KFP v2)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the whole DAG locally (kfp.local)")
    run.add_argument("--data-dir", help="raw ml-100k folder (u.data, u.item); default: tfds")
    run.add_argument(
        "--output", default="mtrec-output", help="output folder (default: %(default)s)"
    )
    run.add_argument("--model-name", default="mtrec")
    run.add_argument(
        "--require-blessed",
        action="store_true",
        help="exit with status 3 when the model is not blessed",
    )
    add_config_arguments(run)
    run.set_defaults(func=cmd_run)

    comp = commands.add_parser("compile", help="write the KFP IR YAML")
    comp.add_argument("--output", default="pipeline.yaml")
    comp.add_argument("--image", default=DEFAULT_IMAGE, help="component image (from ./Dockerfile)")
    comp.set_defaults(func=cmd_compile)

    sub = commands.add_parser("submit", help="submit a run to Kubeflow Pipelines")
    sub.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    sub.add_argument("--experiment")
    sub.add_argument("--run-name")
    sub.add_argument("--namespace")
    sub.add_argument("--image", default=DEFAULT_IMAGE)
    sub.add_argument("--data-dir", help="data folder as seen from the cluster; default: tfds")
    sub.add_argument("--serving-model-dir", default=DEFAULT_SERVING_MODEL_DIR)
    sub.add_argument("--model-name", default="mtrec")
    add_config_arguments(sub)
    sub.set_defaults(func=cmd_submit)

    ing = commands.add_parser("ingest", help="run the ingestion stage alone")
    ing.add_argument("--data-dir", help="raw ml-100k folder; default: tfds")
    ing.add_argument("--ratings-output", required=True)
    ing.add_argument("--movies-output", required=True)
    ing.set_defaults(func=cmd_ingest)

    pre = commands.add_parser("preprocess", help="run the Beam preprocessing stage alone")
    pre.add_argument("--ratings", required=True, help="ingestion ratings output folder")
    pre.add_argument("--output", required=True)
    pre.add_argument(
        "--beam-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="standard Beam pipeline options, e.g. --beam-args --runner=DataflowRunner ...",
    )
    add_config_arguments(pre, ("preprocessing",))
    pre.set_defaults(func=cmd_preprocess)

    tr = commands.add_parser("train", help="run the training stage alone")
    tr.add_argument("--examples", required=True, help="preprocessing output folder")
    tr.add_argument("--output", required=True, help="model artifact folder")
    add_config_arguments(tr, ("training",))
    tr.set_defaults(func=cmd_train)

    ev = commands.add_parser("evaluate", help="run the evaluation stage alone")
    ev.add_argument("--model", required=True)
    ev.add_argument("--examples", required=True)
    ev.add_argument("--output", required=True, help="folder for metrics, blessing and report")
    ev.add_argument("--serving-model-dir", help="export base holding the previously blessed model")
    ev.add_argument("--model-name", default="mtrec")
    add_config_arguments(ev, ("gates",))
    ev.set_defaults(func=cmd_evaluate)

    ex = commands.add_parser("export", help="run the export stage alone (blessed models only)")
    ex.add_argument("--model", required=True)
    ex.add_argument("--examples", required=True)
    ex.add_argument("--blessing", required=True, help="evaluation output folder")
    ex.add_argument("--serving-model-dir", required=True)
    ex.add_argument("--model-name", default="mtrec")
    ex.add_argument("--version", type=int)
    ex.set_defaults(func=cmd_export)

    cmp = commands.add_parser(
        "compare", help="train the seed's three variants and ours on one split; one table"
    )
    cmp.add_argument("--data-dir", required=True, help="raw ml-100k folder")
    cmp.add_argument("--output", default="mtrec-compare")
    cmp.add_argument("--epochs", type=int, help="override every configuration's epochs")
    cmp.set_defaults(func=cmd_compare)

    _add_serving_commands(commands)
    return parser


def _add_serving_commands(commands) -> None:
    """`mtrec serve` and `mtrec query` (serving/)."""
    from serving import cli as serving_cli

    srv = commands.add_parser("serve", help="serve an export over the TF Serving gRPC API")
    serving_cli.add_serve_arguments(srv)
    srv.set_defaults(func=serving_cli.serve_main)
    qry = commands.add_parser("query", help="recommend for a user through a running server")
    serving_cli.add_query_arguments(qry)
    qry.set_defaults(func=serving_cli.query_main)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except MtrecError as err:
        print(f"mtrec: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
