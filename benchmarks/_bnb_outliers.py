"""bitsandbytes' LLM.int8() on this CPU, for benchmarks/outliers.py (runs under the peer venv, which has
bitsandbytes; qformat is imported from the repository).

    bench-data/peer-venv/bin/python benchmarks/_bnb_outliers.py FOLDER WINDOWS.pt PROMPT.pt SECONDS

Perplexity over the same token windows as the main script, for the fp32 model and for bitsandbytes 8-bit (threshold
6, lm_head kept, transformers' defaults); then prefill-128 and one-token decode of bitsandbytes, qformat's W8A8
(plain and threshold 6, quantized in memory) and the bf16 model, timed together in this one process. Prints one JSON
line.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402


def perplexity(model, windows: list[torch.Tensor]) -> float:
    """exp(mean next-token NLL) over every predicted token of every window (qformat.eval's definition)."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for ids in windows:
            logits = model(ids).logits[0, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def main() -> None:
    folder, windows_file, prompt_file, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    warnings.filterwarnings("ignore")
    import bitsandbytes
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    import qformat
    from outliers import speed_fns, timed_together

    hf_logging.disable_progress_bar()
    torch.set_num_threads(torch.get_num_threads())
    windows = torch.load(windows_file)
    prompt = torch.load(prompt_file)
    fp32 = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    bnb = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, device_map="cpu",
        quantization_config=BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=6.0)).eval()
    row = {"version": bitsandbytes.__version__, "ppl_fp32": perplexity(fp32, windows), "ppl": perplexity(bnb, windows)}
    plain = copy.deepcopy(fp32)
    qformat.quantize_(plain, scheme="w8a8-int8")
    t6 = copy.deepcopy(fp32)
    qformat.quantize_(t6, scheme="w8a8-int8", outlier_threshold=6.0)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    models = {"bnb": bnb, "qformat": plain, "qformat_t6": t6, "bf16": bf16}
    fns = {name: speed_fns(model.eval(), prompt) for name, model in models.items()}
    for kind, index in (("prefill", 0), ("decode", 1)):
        times = timed_together({name: pair[index] for name, pair in fns.items()}, seconds)
        for name, ms in times.items():
            row[f"{kind}_{name}"] = ms
    print(json.dumps(row))


if __name__ == "__main__":
    main()
