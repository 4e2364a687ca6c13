"""``python -m diffuse_engine.distributed``: a tensor-parallel worker process, started by rank 0 (see
:func:`diffuse_engine.distributed.worker.spawn_worker`; its settings come in the environment)."""

import base64
import os
import pickle

from .worker import worker_main

if __name__ == "__main__":
    worker_main(pickle.loads(base64.b64decode(os.environ["DIFFUSE_TP_WORKER"])))
