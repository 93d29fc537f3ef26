"""Serving: a TF Serving-compatible model server for the exported recommender, and a client.

- `serving.server.ModelServer`: gRPC PredictionService / ModelService / health, and REST;
- `serving.config.ServerConfig`: every setting (the `mtrec serve` flags are built from it);
- `serving.models`: which versions of which models are served (policies, labels, reloads);
- `serving.signatures`: a loaded version's signatures adapted to requests, warm-up;
- `serving.tensors`: TensorProto <-> numpy with sizes checked before decoding;
- `serving.predict`, `serving.grpc_api`, `serving.rest_api`, `serving.metrics`: one Predict path,
  its two front ends, and its Prometheus metrics;
- `serving.model_config`: TF Serving's model config file;
- `serving.client.RecommenderClient`: retrieve, rank, recommend, status, metadata;
- `serving.cli`: `mtrec serve` and `mtrec query`.
Submodules import TensorFlow; this package and `serving.config` do not, so the CLI starts fast.
"""
