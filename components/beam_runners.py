"""Beam runner options: one place that turns `--runner` and `--beam-args` into PipelineOptions.

Preprocessing and evaluation both run as Beam jobs; they name the runner the same way and pass the
user's runner flags (Dataflow's --project/--region/--temp_location, Flink's --flink_master, ...)
through untouched, so a graph that runs on DirectRunner here is submitted unchanged elsewhere.
"""

from __future__ import annotations

from apache_beam.options.pipeline_options import PipelineOptions


def pipeline_options(runner: str, beam_args: list[str] | None = None) -> PipelineOptions:
    """The options for one Beam job: the named runner, then the user's flags (which win)."""
    return PipelineOptions([f"--runner={runner}", *(beam_args or [])])
