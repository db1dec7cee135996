"""Tiny random transformers models built from config, saved as real Hugging Face folders, for tests and examples.

They cover the architectures qformat's users start from: Llama (decoder LLMs), OPT (the LLM.int8 paper's model),
BART (Intel's int8 BART) and XLM-R (the SDQ paper's model). Dimensions are multiples of 16 so every Linear is
quantizable, except where a test needs otherwise: XLM-R's 3-label classifier head is deliberately too narrow
(a `shape` fallback). Weights are random with a fixed seed; they test plumbing, not accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

__all__ = ["TINY_ARCHITECTURES", "build_tiny_model", "save_random_llama", "save_tiny_model"]


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False))


def _opt():
    from transformers import OPTConfig, OPTForCausalLM

    # word_embed_proj_dim != hidden_size gives OPT-350m's project_in/project_out Linear layers.
    return OPTForCausalLM(OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
        max_position_embeddings=128, word_embed_proj_dim=32))


def _bart():
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(
        d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=256, max_position_embeddings=128))


def _xlm_roberta():
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    return XLMRobertaForSequenceClassification(XLMRobertaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
        max_position_embeddings=130, num_labels=3))


TINY_ARCHITECTURES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": _llama,
    "opt": _opt,
    "bart": _bart,
    "xlm-roberta": _xlm_roberta,
}


def build_tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random model of `arch` (a key of `TINY_ARCHITECTURES`), deterministic for a given seed."""
    torch.manual_seed(seed)
    model = TINY_ARCHITECTURES[arch]()
    return model.to(dtype).eval()


def save_tiny_model(arch: str, folder: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Save a tiny model plus the kinds of non-weight files real repos carry, and return `folder`."""
    model = build_tiny_model(arch, seed=seed, dtype=dtype)
    model.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 128}) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}) + "\n")
    return folder


def save_random_llama(folder: Path, *, hidden_size: int, num_layers: int, vocab_size: int,
                      dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """A random Llama of a chosen size (intermediate = 8/3 hidden, rounded to 64), saved with save_pretrained."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden_size, intermediate_size=(hidden_size * 8 // 3 + 63) // 64 * 64,
                         num_hidden_layers=num_layers, num_attention_heads=max(1, hidden_size // 64),
                         num_key_value_heads=max(1, hidden_size // 128), vocab_size=vocab_size,
                         max_position_embeddings=256, tie_word_embeddings=False)
    LlamaForCausalLM(config).to(dtype).save_pretrained(folder)
    return folder
