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
    DEFAULT_SERVING_MODEL_DIR,
    TRAINING_PRESETS,
    GateConfig,
    IngestionConfig,
    KubeflowConfig,
    PipelineConfig,
    PreprocessingConfig,
    TrainingConfig,
    training_preset,
)
from components.errors import MtrecError
from components.features import DEFAULT_MODEL_NAME

SECTIONS: dict[str, type] = {
    "ingestion": IngestionConfig,
    "preprocessing": PreprocessingConfig,
    "training": TrainingConfig,
    "gates": GateConfig,
}
PIPELINE_SECTIONS = tuple(SECTIONS)


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
    if field.metadata.get("flag"):  # a repeatable flag (tuple of strings)
        return str, "TEXT"
    if isinstance(default, bool):
        return _parse_bool, "BOOL"
    if isinstance(default, tuple):
        return _parse_ints, "N,N,..."
    if isinstance(default, int):
        return int, "N"
    if isinstance(default, float):
        return float, "X"
    return str, "TEXT"


def add_config_arguments(parser: argparse.ArgumentParser, sections=PIPELINE_SECTIONS) -> None:
    """One flag per config field (e.g. TrainingConfig.learning_rate -> --learning-rate)."""
    for section in sections:
        cls = SECTIONS.get(section, KubeflowConfig)
        group = parser.add_argument_group(f"{section} ({cls.__name__})")
        for field in dataclasses.fields(cls):
            parse, metavar = _arg_type(field)
            repeated = field.metadata.get("flag")
            group.add_argument(
                _flag(repeated or field.name),
                dest=f"{section}.{field.name}",
                type=parse,
                metavar=metavar,
                default=None,
                action="append" if repeated else "store",
                help="repeatable" if repeated else f"default: {field.default!r}",
            )
        if cls is KubeflowConfig:
            group.add_argument(
                "--no-cache",
                dest="kubeflow.enable_caching",
                action="store_const",
                const=False,
                help="recompute every task (same as --enable-caching false)",
            )
    if "training" in sections:
        parser.add_argument(
            "--preset",
            choices=sorted(TRAINING_PRESETS),
            default="default",
            help="training settings to start from: 'seed' is the seed notebook's model, "
            "'large' the settings for millions of ratings (bench/scale.py)",
        )


def _section_changes(values: dict, section: str, cls: type) -> dict:
    changes = {}
    for field in dataclasses.fields(cls):
        value = values.get(f"{section}.{field.name}")
        if value is not None:
            changes[field.name] = tuple(value) if field.metadata.get("flag") else value
    return changes


def kubeflow_from_args(args: argparse.Namespace) -> KubeflowConfig:
    return KubeflowConfig().replace(**_section_changes(vars(args), "kubeflow", KubeflowConfig))


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    values = vars(args)
    sections = {}
    for section, cls in SECTIONS.items():
        if section == "training":
            base = training_preset(values.get("preset") or "default")
        else:
            base = cls()
        changes = _section_changes(values, section, cls)
        sections[section] = base.replace(**changes) if changes else base
    return PipelineConfig(
        data_dir=values.get("data_dir") or "",
        output_dir=values.get("output") or "mtrec-output",
        model_name=values.get("model_name") or DEFAULT_MODEL_NAME,
        serving_model_dir=values.get("serving_model_dir") or "",
        refit_on_all=bool(values.get("refit_on_all")),
        **sections,
    )


# --- commands ---


def cmd_run(args: argparse.Namespace) -> int:
    from components.evaluation.evaluator import table_rows
    from components.evaluation.report import format_table
    from pipeline.runners import run_local

    config = config_from_args(args)
    if not args.verbose:  # kfp.local's own notices: in logs/pipeline.log, not on the terminal
        logging.getLogger().setLevel(logging.WARNING)
    result = run_local(config, verbose=args.verbose)
    print()
    print(format_table(table_rows(result.metrics), SUMMARY_COLUMNS))
    print()
    for gate in result.blessing["gates"]:
        verdict = "PASS" if gate["passed"] else "FAIL"
        print(
            f"gate {gate['name']:<28} {verdict}  {gate['value']:.4f} {gate['comparison']} "
            f"{gate['threshold']:.4f}"
        )
    print()
    print(f"blessed:   {'yes' if result.blessed else 'no'}")
    print(f"model:     {result.model_path or '(not pushed: the model is not blessed)'}")
    print(f"report:    {os.path.join(result.output_dir, 'report.html')} (and report.md)")
    print(f"catalogue: {os.path.join(result.output_dir, 'movies.tsv')}")
    print(f"logs:      {result.log_dir}")
    stages = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.timings.items())
    print(f"time:      {result.seconds:.1f}s ({stages})")
    return 0 if result.blessed or not args.require_blessed else 3


REFIT_HELP = (
    "after blessing, refit on train + validation + test with the same settings and push that "
    "model (the blessing keeps the evaluated model's figures)"
)
SUMMARY_COLUMNS = ("system", "hit@10", "recall@10", "ndcg@10", "seed_hit@10", "rmse", "rmse_stars")


def cmd_compile(args: argparse.Namespace) -> int:
    from pipeline.dag import compile_pipeline

    path = compile_pipeline(args.output, kubeflow_from_args(args))
    print(f"wrote {path}")
    return 0


def _cluster_arguments(args: argparse.Namespace) -> dict:
    """What `submit` and `schedule` share: the endpoint, the run's configuration, the cluster."""
    return {
        "host": args.host,
        "config": config_from_args(args),
        "settings": kubeflow_from_args(args),
        "experiment": args.experiment,
        "namespace": args.namespace,
        "pipeline_root": args.pipeline_root,
    }


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.runners import submit

    run_id = submit(**_cluster_arguments(args), run_name=args.run_name)
    print(f"submitted run {run_id} to {args.host}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from pipeline.runners import schedule

    job_id = schedule(**_cluster_arguments(args), cron=args.cron, job_name=args.job_name)
    print(f"created recurring run {job_id} ({args.cron}) on {args.host}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from components.ingestion.ingest import run_ingestion

    config = config_from_args(args)
    report = run_ingestion(
        args.data_dir or "", args.ratings_output, args.movies_output, config.ingestion
    )
    print(json.dumps(report.to_dict(), indent=2))
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from components.preprocessing.pipeline import run_preprocessing

    config = config_from_args(args)
    stats = run_preprocessing(args.ratings, args.output, config.preprocessing, args.beam_args)
    print(json.dumps(stats, indent=2, sort_keys=True))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from components.training.trainer import run_training

    config = config_from_args(args)
    history = run_training(args.examples, args.output, config.training, config.model_name)
    print(json.dumps({k: v[-1] for k, v in history.items()}, indent=2, sort_keys=True))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from components.evaluation.evaluator import run_evaluation
    from components.evaluation.report import format_table

    config = config_from_args(args)
    gates = config.gates
    if args.beam_args:  # --beam-args ... is the last flag: the rest of the line
        gates = gates.replace(evaluation_beam_args=(*gates.evaluation_beam_args, *args.beam_args))
    result = run_evaluation(
        args.model,
        args.examples,
        args.output,
        gates,
        args.serving_model_dir or "",
        config.model_name,
    )
    print(format_table(result.table()))
    print(f"blessed: {result.blessed}  ({os.path.join(args.output, 'blessing.json')})")
    return 0


def cmd_infra_validate(args: argparse.Namespace) -> int:
    from components.infra_validation.validator import run_infra_validation

    result = run_infra_validation(args.model, args.output, args.model_name)
    print(json.dumps(result, indent=2))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from components.push.pusher import push

    path = push(
        args.model,
        args.blessing,
        args.infra_blessing,
        args.serving_model_dir,
        args.model_name,
        args.version,
    )
    print(f"pushed {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from components.evaluation.report import format_table
    from pipeline.experiments import compare_variants

    rows = compare_variants(args.data_dir, args.output, args.epochs)
    print(format_table(rows))
    print(f"report: {os.path.join(args.output, 'report.md')}")
    return 0


def _version(text: str) -> int:
    from components.artifacts.model_versions import MAX_VERSION

    if not text.isdigit() or not 0 < int(text) <= MAX_VERSION:
        raise argparse.ArgumentTypeError(f"expected an integer in 1..{MAX_VERSION}, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(
        prog="mtrec", description="MovieLens multi-task recommender pipeline (KFP v2)."
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show every task's log and debug logging"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the whole DAG locally (kfp.local)")
    run.add_argument(
        "--data-dir",
        help="a MovieLens folder (ml-100k, ml-1m/10m, ml-20m/25m/latest): local, s3:// or gs://; "
        "default: tensorflow-datasets; for your own logs see --interactions",
    )
    run.add_argument(
        "--output", default="mtrec-output", help="output folder (default: %(default)s)"
    )
    run.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    run.add_argument(
        "--serving-model-dir",
        help="where blessed models are pushed: local, s3:// or gs:// (default: <output>/serving)",
    )
    run.add_argument("--refit-on-all", action="store_true", help=REFIT_HELP)
    run.add_argument(
        "--require-blessed",
        action="store_true",
        help="exit with status 3 when the model is not blessed",
    )
    add_config_arguments(run)
    run.set_defaults(func=cmd_run)

    comp = commands.add_parser("compile", help="write the KFP IR YAML")
    comp.add_argument("--output", default="pipeline.yaml")
    add_config_arguments(comp, ("kubeflow",))
    comp.set_defaults(func=cmd_compile)

    for name, func, text in (
        ("submit", cmd_submit, "submit a run to Kubeflow Pipelines"),
        ("schedule", cmd_schedule, "create a recurring run on Kubeflow Pipelines"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument(
            "--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080"
        )
        sub.add_argument("--experiment", default="mtrec")
        sub.add_argument("--namespace")
        sub.add_argument("--pipeline-root", help="artifact store of the run, e.g. s3://bucket/root")
        sub.add_argument(
            "--data-dir", help="data folder as the cluster sees it (a PVC path, s3:// or gs://)"
        )
        sub.add_argument("--serving-model-dir", default=DEFAULT_SERVING_MODEL_DIR)
        sub.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
        sub.add_argument("--refit-on-all", action="store_true", help=REFIT_HELP)
        if name == "submit":
            sub.add_argument("--run-name")
        else:
            sub.add_argument(
                "--cron", required=True, help="KFP cron, seconds first, e.g. '0 0 3 * * *'"
            )
            sub.add_argument("--job-name", default="mtrec-recurring")
        add_config_arguments(sub, (*PIPELINE_SECTIONS, "kubeflow"))
        sub.set_defaults(func=func)

    ing = commands.add_parser("ingest", help="run the ingestion stage alone")
    ing.add_argument("--data-dir", help="raw ml-100k folder; default: tfds")
    ing.add_argument("--ratings-output", required=True)
    ing.add_argument("--movies-output", required=True)
    add_config_arguments(ing, ("ingestion",))
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
    tr.add_argument("--output", required=True, help="model artifact folder (a SavedModel)")
    tr.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    add_config_arguments(tr, ("training",))
    tr.set_defaults(func=cmd_train)

    ev = commands.add_parser("evaluate", help="run the evaluation stage alone")
    ev.add_argument("--model", required=True, help="training output (a SavedModel)")
    ev.add_argument("--examples", required=True)
    ev.add_argument("--output", required=True, help="folder for metrics, blessing and report")
    ev.add_argument(
        "--serving-model-dir", help="push location holding the previously blessed model"
    )
    ev.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    ev.add_argument(
        "--beam-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="standard Beam pipeline options for the evaluation job (added to "
        "--evaluation-beam-arg), e.g. --beam-args --runner=DataflowRunner ...",
    )
    add_config_arguments(ev, ("gates",))
    ev.set_defaults(func=cmd_evaluate)

    iv = commands.add_parser(
        "infra-validate", help="load a SavedModel as TF Serving does and in mtrec serve"
    )
    iv.add_argument("--model", required=True, help="training output (a SavedModel)")
    iv.add_argument("--output", required=True, help="folder for infra_blessing.json")
    iv.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    iv.set_defaults(func=cmd_infra_validate)

    ps = commands.add_parser("push", help="push a blessed, infra-validated model")
    ps.add_argument("--model", required=True, help="training output (a SavedModel)")
    ps.add_argument("--blessing", required=True, help="evaluation output folder")
    ps.add_argument("--infra-blessing", required=True, help="infra-validation output folder")
    ps.add_argument("--serving-model-dir", required=True, help="local, s3:// or gs://")
    ps.add_argument("--model-name", default=DEFAULT_MODEL_NAME)
    ps.add_argument("--version", type=_version, help="default: one above the newest")
    ps.set_defaults(func=cmd_push)

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
