"""Blessing gates: thresholds as data, checked against the candidate's metrics.

Absolute thresholds, margins over the in-run baselines, and no regression beyond a tolerance
against the previously blessed model (TFX's value and change thresholds).
"""

from dataclasses import dataclass
from typing import Any

from components.config import GateConfig

TOLERANCE = 1e-12  # a value equal to its threshold passes, whatever the float rounding


@dataclass
class Gate:
    name: str
    value: float
    threshold: float
    comparison: str  # "<=" or ">="
    description: str

    @property
    def passed(self) -> bool:
        if self.comparison == "<=":
            return bool(self.value <= self.threshold + TOLERANCE)
        return bool(self.value >= self.threshold - TOLERANCE)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "threshold": self.threshold,
            "comparison": self.comparison,
            "passed": self.passed,
            "description": self.description,
        }


def all_passed(gates: list[Gate]) -> bool:
    return all(g.passed for g in gates)


def build_gates(
    metrics: dict[str, float],
    baselines: dict[str, dict[str, float]],
    previous: dict[str, Any] | None,
    config: GateConfig,
) -> list[Gate]:
    """The gates for a candidate. A model without ratings (implicit feedback: no RMSE) has no
    RMSE gates."""
    hit, rmse = metrics["hit@10"], metrics.get("rmse")
    gates = []
    if rmse is not None:
        gates.append(
            Gate("rmse", rmse, config.max_rmse, "<=", "RMSE (normalised) at most max_rmse")
        )
    gates.append(
        Gate(
            "hit@10", hit, config.min_hit_rate, ">=", "hit@10 (seen excluded) at least min_hit_rate"
        )
    )
    if config.require_beat_baselines:
        gates.append(
            Gate(
                "hit@10 vs popularity",
                hit,
                baselines["popularity"]["hit@10"] + config.baseline_hit_rate_margin,
                ">=",
                "beats popularity's hit@10 by baseline_hit_rate_margin",
            )
        )
    if config.require_beat_baselines and rmse is not None and "user+item bias" in baselines:
        gates.append(
            Gate(
                "rmse vs user+item bias",
                rmse,
                baselines["user+item bias"]["rmse"] - config.baseline_rmse_margin,
                "<=",
                "beats the bias model's RMSE by baseline_rmse_margin",
            )
        )
    if config.require_beat_baselines and "EASE" in baselines:
        gates.append(
            Gate(
                "hit@10 vs EASE",
                hit,
                baselines["EASE"]["hit@10"] + config.ease_hit_rate_margin,
                ">=",
                "beats EASE's hit@10 (lambda chosen on validation) by ease_hit_rate_margin",
            )
        )
    if previous and rmse is not None and "rmse" in previous["metrics"]:
        version = previous["version"]
        gates.append(
            Gate(
                f"rmse vs blessed v{version}",
                rmse,
                previous["metrics"]["rmse"] + config.max_regression_rmse,
                "<=",
                "no worse than the previously blessed model by more than max_regression_rmse",
            )
        )
    if previous:
        version = previous["version"]
        gates.append(
            Gate(
                f"hit@10 vs blessed v{version}",
                hit,
                previous["metrics"]["hit@10"] - config.max_regression_hit_rate,
                ">=",
                "no worse than the previously blessed model by more than max_regression_hit_rate",
            )
        )
    return gates
