# The component image of every KFP task (and a base for `mtrec serve`).
#   docker build -t REGISTRY/mtrec:0.1.0 .                       # CPU
#   docker build --build-arg EXTRAS=gpu -t REGISTRY/mtrec:0.1.0-gpu .   # TensorFlow with CUDA
# Then: mtrec compile --image REGISTRY/mtrec:0.1.0 (or mtrec submit --image ...).
# Serve (the server binds 127.0.0.1 unless told otherwise: in a container, every interface):
#   docker run -p 8500:8500 -p 8501:8501 -v "$PWD/mtrec-output/serving:/models" REGISTRY/mtrec:0.1.0 \
#     mtrec serve --host 0.0.0.0 --model-base-path /models --model-name mtrec --port 8500 --rest-port 8501
#   (add --grpc-processes N to answer gRPC from N processes on N cores; README, "Several cores")
FROM python:3.11-slim

ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    TF_CPP_MIN_LOG_LEVEL=2

WORKDIR /opt/mtrec
COPY pyproject.toml README.md ./
COPY components ./components
COPY pipeline ./pipeline
COPY serving ./serving
RUN pip install --upgrade pip \
    && if [ -n "$EXTRAS" ]; then pip install ".[$EXTRAS]"; else pip install .; fi \
    && mtrec --help >/dev/null

# KFP runs `python3 -m kfp.dsl.executor_main ...` in this image; `mtrec serve` is the server.
EXPOSE 8500 8501
CMD ["mtrec", "--help"]
