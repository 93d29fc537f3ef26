"""Errors a user can act on. The CLI prints their message, without a traceback, and exits 2."""

import sys

# The module kfp.local and a cluster's pods run a task's function in (`python -m ...`).
KFP_EXECUTOR_MODULE = "kfp.dsl.executor_main"


# At most this many problems (bad lines, dead letters) are named in a report or an error.
MAX_REPORTED_PROBLEMS = 20


class MtrecError(Exception):
    """Base class: the message names the problem (file, line, field or setting)."""


class DataError(MtrecError):
    """Input data is missing or malformed."""


class TrainingError(MtrecError):
    """Training could not finish (e.g. a worker of a multi-worker run died)."""


class GateError(MtrecError):
    """A stage refused to go on (e.g. export of a model that is not blessed)."""


class exit_on_error:  # noqa: N801 - used as a context manager, reads like a statement
    """A KFP task's body: logging set up once, and a user-facing error ends the task with its
    message, not a traceback.

    `with exit_on_error(): ...` prints `mtrec: error: <message>` and exits with status 2 on an
    MtrecError; other exceptions (bugs) keep their traceback. When the body succeeds inside a
    KFP executor process, the process skips the interpreter's teardown once KFP has written the
    task's outputs (`skip_teardown_at_exit`).
    """

    def __enter__(self) -> None:
        import logging

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, MtrecError):
            import sys

            print(f"mtrec: error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(2)
        if error is None and _in_kfp_executor():
            skip_teardown_at_exit()
        return False


def _in_kfp_executor() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", None) == KFP_EXECUTOR_MODULE


_uncaught: list[BaseException] = []


def skip_teardown_at_exit() -> None:
    """At a clean exit, flush the streams and logs and end the process at once: unloading
    TensorFlow's modules and threads takes 1-2 s per task on 2 cores, after every output is
    written and closed (KFP's executor writes them before its main returns, and nothing after
    it calls `sys.exit`). An uncaught exception keeps the normal exit and its status."""
    import atexit

    previous_hook = sys.excepthook

    def remember(kind, error, traceback):
        _uncaught.append(error)
        previous_hook(kind, error, traceback)

    sys.excepthook = remember
    atexit.register(_exit_now)


def _exit_now() -> None:
    import logging
    import os

    if _uncaught:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            return  # a closed stream: let the interpreter end the usual way
    os._exit(0)
