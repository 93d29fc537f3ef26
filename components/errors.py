"""Errors a user can act on. The CLI prints their message, without a traceback, and exits 2."""


class MtrecError(Exception):
    """Base class: the message names the problem (file, line, field or setting)."""


class DataError(MtrecError):
    """Input data is missing or malformed."""


class GateError(MtrecError):
    """A stage refused to go on (e.g. export of a model that is not blessed)."""


class exit_on_error:  # noqa: N801 - used as a context manager, reads like a statement
    """A KFP task's body: logging set up once, and a user-facing error ends the task with its
    message, not a traceback.

    `with exit_on_error(): ...` prints `mtrec: error: <message>` and exits with status 2 on an
    MtrecError; other exceptions (bugs) keep their traceback.
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
        return False
