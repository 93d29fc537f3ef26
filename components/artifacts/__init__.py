"""What the stages exchange, one module per artifact: `ratings` (ingestion -> preprocessing),
`examples` and `vocabulary` (preprocessing -> training, evaluation), `saved_model` (training ->
evaluation, infra-validation, push, serving), `model_versions` (the pushed versions' folders)."""
