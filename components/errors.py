"""Errors a user can act on. The CLI prints their message, without a traceback, and exits 2."""


class MtrecError(Exception):
    """Base class: the message names the problem (file, line, field or setting)."""


class DataError(MtrecError):
    """Input data is missing or malformed."""


class GateError(MtrecError):
    """A stage refused to go on (e.g. export of a model that is not blessed)."""
