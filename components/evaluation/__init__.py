"""Stage 4, evaluation: `evaluator.run_evaluation` is the entry point; metrics in `metrics.py`,
baselines in `baselines.py`, gates in `gates.py`, the report in `report.py`."""
