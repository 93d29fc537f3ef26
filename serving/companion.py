"""A companion gRPC process of `mtrec serve --grpc-processes N`, started by the first process
(`python -m serving.companion`, its ServerConfig in the environment); see serving/processes.py."""

import json
import logging
import os
import shutil
import sys
import threading


def main() -> int:
    # Before TensorFlow is imported, or its logger adds a handler of its own.
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s [gRPC process {os.getpid()}] %(name)s: %(message)s",
    )
    from serving.cli import run_server
    from serving.config import ServerConfig
    from serving.processes import CONFIG_ENV, GROUP_ENV, stop_when_stdin_closes

    config = ServerConfig(**json.loads(os.environ[CONFIG_ENV]))
    stop, orphaned = threading.Event(), threading.Event()
    stop_when_stdin_closes(stop, orphaned)
    status = run_server(config, stop, companion=True)
    if orphaned.is_set():  # the first process is gone without cleaning up
        shutil.rmtree(os.environ[GROUP_ENV], ignore_errors=True)
    return status


if __name__ == "__main__":
    status = main()
    # Drained and stopped: skip unloading TensorFlow (1-2 s the first process would wait for).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
