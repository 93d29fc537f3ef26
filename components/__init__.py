"""The pipeline's stages, one package each, in DAG order, and what they exchange.

ingestion/ -> preprocessing/ -> training/ -> evaluation/ -> infra_validation/ -> push/

- `artifacts/`: one module per artifact the stages exchange (ratings, examples, vocabulary,
  saved_model, and model_versions: the TF Serving version folders the pusher writes);
- `config.py` (the typed configuration), `errors.py`, `storage.py` (local, s3://, gs://),
  `features.py` (column, split and signature names), `progress.py`: shared by every stage.

Each stage is plain Python, testable without KFP; `pipeline/tasks.py` wraps each in a thin KFP
component and `pipeline/dag.py` wires them.
"""
