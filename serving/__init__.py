"""Serving: a TF Serving-compatible model server for the exported recommender, and a client.

- `serving.server.ModelServer`: gRPC PredictionService / ModelService / health, optional REST;
- `serving.models.ModelManager`: finds, loads, warms up and swaps versions;
- `serving.client.RecommenderClient`: retrieve, rank, recommend, status, metadata;
- `serving.cli`: `mtrec serve` and `mtrec query`.
Submodules import TensorFlow; this package does not, so the CLI starts fast.
"""
