"""What `mtrec run` shows while kfp.local runs the DAG: one line per stage, with its state, elapsed
time and, on long stages, a progress bar; every task's full log goes to a file instead.

kfp.local writes everything (its own notices, each task's streamed output) to `sys.stdout`.
`StageRouter` stands in for it during the run: it follows the "Executing task" / "finished with
status" lines to know which task is running, appends each line to that task's log file, reads
the progress markers tasks print (`components.progress`), keeps `mtrec: error:` lines to show,
and redraws the stage table (rich) on a terminal, or prints a line per finished stage otherwise.
"""

import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from components import progress

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '?([\w-]+)'?")
_FINISHED = re.compile(r"Task '?([\w-]+)'? finished with status (\w+)")
ERROR_PREFIX = "mtrec: error:"
PIPELINE_LOG = "pipeline"  # the log of kfp.local's own lines, outside any task


_TASK_SUFFIX = re.compile(r"-op(-[0-9]+)?$")  # kfp names a component's second task <name>-op-2


def stage_of(task: str) -> str:
    """kfp.local's task name ('infra-validation-op', '...-op-2') -> the stage name."""
    return _TASK_SUFFIX.sub("", task)


@dataclass
class Stage:
    name: str
    state: str = "waiting"  # waiting, running, done, failed, skipped
    started: float = 0.0
    finished: float = 0.0
    done: int = 0
    total: int | None = None
    unit: str = ""

    @property
    def seconds(self) -> float:
        if not self.started:
            return 0.0
        return (self.finished or time.monotonic()) - self.started


@dataclass
class StageRouter:
    """A file-like object that replaces sys.stdout while the pipeline runs."""

    log_dir: str
    stage_names: list[str]
    verbose: bool = False
    console: TextIO = field(default_factory=lambda: sys.__stdout__)
    aliases: dict[str, str] = field(default_factory=dict)  # kfp.local task name -> stage
    stages: dict[str, Stage] = field(init=False)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        self.stages = {name: Stage(name) for name in self.stage_names}
        self._current = PIPELINE_LOG
        self._buffer = ""
        self._lock = threading.Lock()
        self._files: dict[str, TextIO] = {}
        self._live = None
        if not self.verbose and self.console.isatty():
            from rich.console import Console
            from rich.live import Live

            self._live = Live(
                get_renderable=self._render,
                console=Console(file=self.console),
                refresh_per_second=4,
                transient=False,
            )

    # --- file-like interface ---

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            while "\n" in self._buffer:
                line, self._buffer = self._buffer.split("\n", 1)
                self._line(line + "\n")
        return len(text)

    def flush(self) -> None:
        return None

    def isatty(self) -> bool:
        return False

    # --- routing ---

    def _line(self, line: str) -> None:
        plain = _ANSI.sub("", line)
        started = _STARTED.search(plain)
        if started:
            self._current = self._name(started.group(1))
            stage = self._stage(self._current)
            stage.state, stage.started = "running", time.monotonic()
        payload = progress.parse(plain)
        if payload is not None:
            stage = self._stage(self._current)
            stage.done = int(payload.get("done", 0))
            stage.total = payload.get("total")
            stage.unit = str(payload.get("unit", ""))
        else:
            self._log(self._current).write(plain)
            if self.verbose:
                self.console.write(line)
        if ERROR_PREFIX in plain:
            self.errors.append(plain.strip())
        finished = _FINISHED.search(plain)
        if finished:
            stage = self._stage(self._name(finished.group(1)))
            stage.finished = time.monotonic()
            stage.state = "done" if finished.group(2) == "SUCCESS" else "failed"
            self._log(stage.name).flush()
            if self._live is None and not self.verbose:
                self.console.write(self._summary_line(stage) + "\n")
                self.console.flush()
            self._current = PIPELINE_LOG

    def _name(self, task: str) -> str:
        return self.aliases.get(task, stage_of(task))

    def _stage(self, name: str) -> Stage:
        if name not in self.stages:
            self.stages[name] = Stage(name)
        return self.stages[name]

    def _log(self, name: str) -> TextIO:
        if name not in self._files:
            self._files[name] = open(  # noqa: SIM115 - closed in close()
                os.path.join(self.log_dir, f"{name}.log"), "a", encoding="utf-8"
            )
        return self._files[name]

    def log_path(self, name: str) -> str:
        return os.path.join(self.log_dir, f"{name}.log")

    # --- display ---

    @staticmethod
    def _summary_line(stage: Stage) -> str:
        mark = {"done": "✓", "failed": "✗", "running": "…", "skipped": "-"}.get(stage.state, " ")
        return f"{mark} {stage.name:<17} {stage.state:<8} {stage.seconds:6.1f}s"

    def _render(self):
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        table = Table.grid(padding=(0, 1))
        for stage in self.stages.values():
            bar = ""
            detail = ""
            if stage.state == "running" and stage.total:
                bar = ProgressBar(
                    total=stage.total, completed=min(stage.done, stage.total), width=24
                )
                detail = f"{stage.done:,}/{stage.total:,} {stage.unit}"
            elif stage.state == "running" and stage.done:
                detail = f"{stage.done:,} {stage.unit}"
            table.add_row(self._summary_line(stage), bar, detail)
        return table

    def __enter__(self) -> "StageRouter":
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        for stage in self.stages.values():
            if stage.state == "waiting":
                stage.state = "skipped"
            elif stage.state == "running":
                stage.state, stage.finished = "failed", time.monotonic()
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
        for handle in self._files.values():
            handle.close()

    def timings(self) -> dict[str, float]:
        return {s.name: round(s.seconds, 1) for s in self.stages.values() if s.started}
