"""Regenerate the golden checkpoints. Tests never run this: the committed bytes are the reference.

Run it only when the format changes on purpose (which needs a format version decision, docs/FORMAT.md section 1),
then review the diff of every file under tests/golden/ and say why in the commit message.

    python tests/golden/make_golden.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

HERE = Path(__file__).parent

#: name -> convert() arguments; every option is explicit so that defaults changing cannot move the golden silently.
GOLDEN = {
    "mixed": dict(scheme="w8a8-int8", overrides=["re:.*mlp\\.down_proj=fp8-dynamic"],
                  ignore=["model.layers.0.self_attn.o_proj"], observer="absmax", base_model="qformat/golden-llama"),
    "sparse24": dict(scheme="w8a16-int8+2:4", observer="absmax", base_model="qformat/golden-llama"),
}


def make_source(folder: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1234)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)


def main() -> None:
    import qformat

    source = HERE / "source"
    shutil.rmtree(source, ignore_errors=True)
    make_source(source)
    for name, options in GOLDEN.items():
        qformat.convert(source, HERE / name, overwrite=True, **options)
        print(qformat.inspect(HERE / name).to_text())


if __name__ == "__main__":
    main()
