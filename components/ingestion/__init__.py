"""Stage 1, ingestion: `ingest.run_ingestion` is the entry point; sources in `movielens.py`
(raw folders, release found by `layouts.py`), `interactions.py` (your own logs) and `tfds.py`;
line parsing shared with preprocessing in `parsing.py`."""
