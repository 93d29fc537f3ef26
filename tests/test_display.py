"""The stage display of `mtrec run`: kfp.local's stdout routed to per-task logs and stage lines."""

import io
import os

from components import progress
from pipeline.display import StageRouter

KFP_LINES = [
    "08:00:00.000 - INFO - Executing task \x1b[96m'ingestion-op'\x1b[0m\n",
    "08:00:00.100 - INFO - Streamed logs:\n",
    "    INFO components.ingestion.movielens: ingested 100 ratings\n",
    "08:00:00.500 - INFO - Task \x1b[96m'ingestion-op'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m\n",
    "08:00:00.600 - INFO - Executing task 'training-op'\n",
    f'    {progress.MARKER} {{"done": 5, "total": 10, "unit": "steps"}}\n',
    "    mtrec: error: something the user can fix\n",
    "08:00:01.000 - ERROR - Task 'training-op' finished with status FAILURE\n",
]


def test_lines_go_to_the_task_logs_and_the_stage_table(tmp_path):
    console = io.StringIO()
    router = StageRouter(str(tmp_path), ["ingestion", "training", "push"], console=console)
    with router:
        for line in KFP_LINES:
            router.write(line[:10])  # split writes, as print() may do
            router.write(line[10:])
    states = {name: stage.state for name, stage in router.stages.items()}
    assert states == {"ingestion": "done", "training": "failed", "push": "skipped"}
    assert router.stages["training"].done == 5 and router.stages["training"].total == 10
    assert router.errors == ["mtrec: error: something the user can fix"]
    with open(os.path.join(tmp_path, "ingestion.log")) as handle:
        assert "ingested 100 ratings" in handle.read()
    with open(os.path.join(tmp_path, "training.log")) as handle:
        text = handle.read()
        assert "mtrec: error:" in text and progress.MARKER not in text
    shown = console.getvalue().splitlines()  # not a terminal: one line per finished stage
    assert [line.split()[:3] for line in shown] == [
        ["✓", "ingestion", "done"],
        ["✗", "training", "failed"],
    ]
    assert list(router.timings()) == ["ingestion", "training"]


def test_progress_markers_round_trip(capsys):
    reporter = progress.Reporter("rows", total=3)
    reporter.advance(3)
    (line,) = capsys.readouterr().out.splitlines()
    assert progress.parse(line) == {"done": 3, "total": 3, "unit": "rows"}
    assert progress.parse("an ordinary log line") is None
