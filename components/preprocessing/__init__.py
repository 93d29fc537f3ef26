"""Stage 2, preprocessing (Apache Beam): `pipeline.run_preprocessing` is the entry point and
`pipeline.build_pipeline` the graph; its transforms are in `parse.py`, `splits.py`,
`vocabularies.py` and `tfrecords.py`."""
