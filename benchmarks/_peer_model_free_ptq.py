"""Runner for the conversion peer: llm-compressor's data-free `model_free_ptq`, in its own environment.

    PEER_PYTHON benchmarks/_peer_model_free_ptq.py SRC_DIR OUT_DIR SCHEME

SCHEME is a compressed-tensors preset (W8A8, FP8_DYNAMIC); CPU, one worker, ignore=["lm_head"] plus the
comma-separated patterns in LC_EXTRA_IGNORE. Prints `IMPORT_SECONDS s` after importing llm-compressor and
`MODEL_FREE_PTQ_OK s` (the call alone) at the end. Not a qformat dependency: benchmarks/convert.py runs it.
"""

import os
import sys
import time

if len(sys.argv) != 4:
    sys.exit(__doc__)
src, out, scheme = sys.argv[1:4]
ignore = ["lm_head"] + [x for x in os.environ.get("LC_EXTRA_IGNORE", "").split(",") if x]

start = time.perf_counter()
from llmcompressor.entrypoints.model_free import model_free_ptq

print(f"IMPORT_SECONDS {time.perf_counter() - start:.3f}", flush=True)
start = time.perf_counter()
model_free_ptq(model_stub=src, save_directory=out, scheme=scheme, ignore=ignore, max_workers=1, device="cpu")
print(f"MODEL_FREE_PTQ_OK {time.perf_counter() - start:.3f}", flush=True)
