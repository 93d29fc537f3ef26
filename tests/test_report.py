"""The evaluation report: files written, PNGs valid, values in the table."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np

from components.evaluation.report import format_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ROWS = [
    {"system": "candidate", "rmse": 0.231234, "hit@10": 0.27891, "recall@10": 0.3},
    {"system": "popularity", "rmse": None, "hit@10": 0.1333},
    {"system": "bias", "rmse": 0.23375, "hit@10": float("nan")},
]
GATES = [
    {"name": "rmse <= max_rmse", "value": 0.231234, "threshold": 0.24, "passed": True},
    {"name": "hit@10 >= min_hit_rate", "value": 0.1, "threshold": 0.15, "passed": False},
]


def test_format_table() -> None:
    table = format_table(ROWS)
    lines = table.splitlines()
    assert lines[0] == "| system | rmse | hit@10 | recall@10 |"
    assert lines[1] == "| --- | --- | --- | --- |"
    assert lines[2] == "| candidate | 0.2312 | 0.2789 | 0.3000 |"
    assert lines[3] == "| popularity | — | 0.1333 | — |"
    assert lines[4] == "| bias | 0.2338 | — | — |"
    assert format_table(ROWS, columns=["hit@10", "system"]).splitlines()[2] == (
        "| 0.2789 | candidate |"
    )


def test_write_report(tmp_path: Path) -> None:
    history = {"loss": [1.0, 0.8, 0.7], "val_rmse": [0.26, 0.245, 0.24]}
    curves = {"candidate": np.linspace(0.05, 0.28, 10), "popularity": np.linspace(0.02, 0.13, 10)}
    paths = write_report(
        str(tmp_path / "out"), ROWS, curves, gates=GATES, history=history, title="run 1",
        data={"rows": {"train": 7}}, timings={"training (s)": 1.5},
    )  # fmt: skip
    assert set(paths) == {"markdown", "html", "training_curves", "hit_at_k"}
    for key in ("training_curves", "hit_at_k"):
        assert Path(paths[key]).read_bytes().startswith(PNG_MAGIC)
    md = Path(paths["markdown"]).read_text(encoding="utf-8")
    assert md.startswith("# run 1")
    assert "| candidate | 0.2312 | 0.2789 | 0.3000 |" in md
    assert "## Gates" in md and "FAIL" in md and "PASS" in md and "NOT BLESSED" in md
    assert "| rows: train | 7 |" in md and "| training (s) | 1.5000 |" in md
    html = Path(paths["html"]).read_text(encoding="utf-8")
    assert "<td>0.2789</td>" in html and "<td>—</td>" in html
    uris = html.split('src="data:image/png;base64,')[1:]
    assert len(uris) == 2
    assert base64.b64decode(uris[0].split('"')[0]).startswith(PNG_MAGIC)


def test_one_training_panel_per_metric_train_against_validation() -> None:
    from components.evaluation.report import training_panels

    panels = training_panels({"rmse": [0.3], "val_rmse": [0.31], "retrieval_loss": [6.0]})
    assert panels == {
        "rmse": {"train": [0.3], "validation": [0.31]},
        "retrieval_loss": {"train": [6.0]},
    }


def test_write_report_without_history_or_gates(tmp_path: Path) -> None:
    paths = write_report(str(tmp_path), ROWS[:1], {"candidate": np.array([0.1, 0.2])})
    assert "training_curves" not in paths
    assert not (tmp_path / "training_curves.png").exists()
    assert (tmp_path / "hit_at_k.png").read_bytes().startswith(PNG_MAGIC)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "Gates" not in md and "training_curves.png" not in md
    paths = write_report(str(tmp_path / "empty"), ROWS[:1], {}, history={})
    assert "training_curves" not in paths
