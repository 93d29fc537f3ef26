"""Stage 1, ingestion: bring the interactions into the pipeline as two artifacts, schema-checked.

Sources: a raw MovieLens folder (`movielens.py`, its release recognised by `layouts.py`), your
own logs (`interactions.py`) or tensorflow-datasets (`tfds.py`). The output is the same for all
(`components/artifacts/ratings.py`).
"""

import logging

from components.artifacts.ratings import IngestionReport
from components.config import IngestionConfig
from components.errors import DataError
from components.ingestion.movielens import ingest_folder
from components.ingestion.tfds import TFDS_RATINGS, ingest_tfds

log = logging.getLogger(__name__)


def run_ingestion(
    data_dir: str, ratings_dir: str, movies_dir: str, config: IngestionConfig | None = None
) -> IngestionReport:
    """Entry point of the stage: your own logs (`config.interactions`), a raw MovieLens folder,
    or tensorflow-datasets."""
    if config is not None and config.interactions:
        if data_dir:
            raise DataError("pass either --data-dir (MovieLens) or --interactions, not both")
        from components.ingestion.interactions import ingest_interactions

        report = ingest_interactions(config, ratings_dir, movies_dir)
    elif data_dir:
        report = ingest_folder(data_dir, ratings_dir, movies_dir)
    else:
        name = config.tfds_name if config is not None else TFDS_RATINGS
        report = ingest_tfds(ratings_dir, movies_dir, ratings_name=name)
    log.info(
        "ingested %d ratings (%d malformed) and %d movies from %s",
        report.ratings_rows,
        report.invalid_rows,
        report.movies,
        report.source,
    )
    for problem in report.problems:
        log.warning("malformed rating row: %s", problem)
    return report
