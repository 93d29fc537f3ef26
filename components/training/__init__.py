"""Stage 3, training: `trainer.run_training` is the entry point; the Keras model in `model.py`
(its layers in `layers.py`, the export-time rating head in `fused_head.py`, the seen-movies
table in `seen_movies.py`), the lazy optimizers in `optimizers.py`."""
