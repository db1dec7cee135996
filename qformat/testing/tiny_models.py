"""Tiny random transformers models built from config, saved as real Hugging Face folders, for tests and examples.

They cover the architectures qformat's users start from: Llama (decoder LLMs), OPT (the LLM.int8 paper's model),
BART (Intel's int8 BART) and XLM-R (the SDQ paper's model); and the layouts that trip name handling: Llava (a vision
tower, a projector and a Llama whose checkpoint names transformers renames on load: `language_model.model.*` is
stored, `model.language_model.*` is built), GPT-NeoX (the head is stored as `embed_out`, built as `lm_head`), Qwen2
(tied head, vocabulary 16x the hidden size, q/k/v biases) and Gemma3 text (tied head, embeddings scaled by
sqrt(hidden)). Dimensions are multiples of 16 so every Linear is quantizable, except where a test needs otherwise:
XLM-R's 3-label classifier head is deliberately too narrow (a `shape` fallback). Weights are random with a fixed
seed; they test plumbing, not accuracy.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

__all__ = ["OUTLIER_CHANNELS", "TINY_ARCHITECTURES", "build_tiny_model", "plant_outlier_features", "save_byte_tokenizer",
           "save_fragile_llama", "save_outlier_llama", "save_peaked_llama", "save_random_llama", "save_tiny_model"]


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


def _llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    # 32x32 images in 16x16 patches: 4 image tokens (the CLS position is dropped). vision_feature_layer=-1 so that
    # both vision layers feed the logits; token 255 (the last of the vocabulary) stands for an image patch.
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=16, projection_dim=64)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
    return LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=255, image_seq_length=4, vision_feature_layer=-1,
        projector_hidden_act="gelu", tie_word_embeddings=False))


def _gpt_neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    # Untied head, stored as `embed_out` (transformers 5.24 builds it as `lm_head`); fused query_key_value.
    return GPTNeoXForCausalLM(GPTNeoXConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
        max_position_embeddings=128, tie_word_embeddings=False))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # Qwen2 always has q/k/v biases; the tied head is far wider than hidden (Qwen2-0.5B: 151936 x 896).
    return Qwen2ForCausalLM(Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1024, max_position_embeddings=128, tie_word_embeddings=True))


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # model_type gemma3_text; one sliding and one full attention layer, as Gemma3 interleaves them.
    return Gemma3ForCausalLM(Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, query_pre_attn_scalar=16, vocab_size=512, max_position_embeddings=128, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True))


TINY_ARCHITECTURES: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": _llama,
    "opt": _opt,
    "bart": _bart,
    "xlm-roberta": _xlm_roberta,
    "llava": _llava,
    "gpt-neox": _gpt_neox,
    "qwen2": _qwen2,
    "gemma3": _gemma3,
}

#: Model-side prefix -> the prefix older Llava repos (llava-hf/*) store; transformers renames them back on load.
_LLAVA_LEGACY_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def _legacy_llava_name(name: str) -> str:
    for model_prefix, stored_prefix in _LLAVA_LEGACY_PREFIXES:
        if name.startswith(model_prefix):
            return stored_prefix + name[len(model_prefix):]
    return name


def _write_legacy_llava_keys(folder: Path) -> None:
    """Rewrite a saved Llava's tensor names into the legacy layout if transformers wrote the model's own names.

    transformers 5.24 already saves the legacy names (it reverses its load-time renaming); this keeps the fixture
    a renamed-keys checkpoint with any transformers version. Tensors and their bytes are unchanged.
    """
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(path)
        if all(_legacy_llava_name(name) == name for name in tensors):
            continue
        save_file({_legacy_llava_name(name): t for name, t in tensors.items()}, path, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {_legacy_llava_name(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2) + "\n")


def build_tiny_model(arch: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny random model of `arch` (a key of `TINY_ARCHITECTURES`), deterministic for a given seed."""
    torch.manual_seed(seed)
    model = TINY_ARCHITECTURES[arch]()
    return model.to(dtype).eval()


def save_tiny_model(arch: str, folder: Path, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Save a tiny model plus the kinds of non-weight files real repos carry, and return `folder`."""
    model = build_tiny_model(arch, seed=seed, dtype=dtype)
    model.save_pretrained(folder)
    if arch == "llava":
        _write_legacy_llava_keys(folder)
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


def save_byte_tokenizer(folder: Path) -> Path:
    """Save a byte-level tokenizer of exactly 256 tokens (one per byte, no merges) into `folder`, so the tiny models
    (vocabulary 256) can be evaluated on real text. Byte 0 doubles as the pad token (text never contains it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # ByteLevel shows byte b as a printable character: itself where printable, else chr(256 + n) in byte order
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(others)}
    vocab = {mapping[b]: b for b in range(256)}
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([mapping[0]])  # already in the vocabulary: keeps id 0 instead of adding id 256
    (folder / "special_tokens_map.json").unlink(missing_ok=True)  # save_tiny_model's "<pad>" is not in this vocab
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=mapping[0], model_max_length=128)
    fast.save_pretrained(folder)
    return folder


def save_fragile_llama(folder: Path, module: str, *, seed: int = 0) -> Path:
    """The tiny Llama (with `save_byte_tokenizer`'s tokenizer) with one module made fragile to quantization: its
    first input column is 100x its other weights, so each row's int8 scale is set by that column and every other
    weight of the row rounds to zero or one step. The full-precision model is still an ordinary model (the column is
    part of it). The head is scaled up 5x so that predictions are peaked: a random model's are near uniform, which
    hides any damage. Sensitivity ranking and fallback-search tests plant a known culprit with it."""
    model = build_tiny_model("llama", seed=seed)
    with torch.no_grad():
        weight = model.get_submodule(module).weight
        weight[:, 0] = 100 * weight.abs().max()
        model.lm_head.weight *= 5
    model.save_pretrained(folder)
    return save_byte_tokenizer(folder)


#: The hidden channels `plant_outlier_features` amplifies by default.
OUTLIER_CHANNELS = (3, 17, 40)


def plant_outlier_features(model: torch.nn.Module, *, channels: tuple[int, ...] = OUTLIER_CHANNELS,
                           gain: float = 64.0) -> torch.nn.Module:
    """Give a Llama-style model LLM.int8()'s "outlier features": in every layer, multiply the `channels` of both
    RMSNorm weights by `gain`. The norms' outputs, the inputs of q/k/v and gate/up, then carry a few channels `gain`
    times larger than the rest in every token, as trained LLMs' hidden states do (Dettmers et al. 2022), while the
    weights stay ordinary. Plain per-token W8A8 spends its int8 range on those channels; the weights' own rounding
    (what W8A16 loses) is the floor any int8-weight method can reach on such a model."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[list(channels)] *= gain
    return model


def save_outlier_llama(folder: Path, *, channels: tuple[int, ...] = OUTLIER_CHANNELS, gain: float = 64.0,
                       seed: int = 0) -> Path:
    """The tiny Llama with `plant_outlier_features` applied and `save_byte_tokenizer`'s tokenizer: plain W8A8 loses
    most of its precision to a few activation channels there, and LLM.int8()'s decomposition or SmoothQuant should
    win it back. The head is scaled up 5x so predictions are peaked (see `save_fragile_llama`)."""
    model = plant_outlier_features(build_tiny_model("llama", seed=seed), channels=channels, gain=gain)
    with torch.no_grad():
        model.lm_head.weight *= 5
    model.save_pretrained(folder)
    return save_byte_tokenizer(folder)


def save_peaked_llama(folder: Path, *, seed: int = 0) -> Path:
    """The tiny Llama shape with weights drawn 7.5x wider than transformers' default (initializer_range 0.15), and a
    byte tokenizer: its next-token distributions are far from uniform, so quantization error shows in the KL from
    it (the default tiny model's outputs are nearly uniform, and every quantized copy of it agrees with it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False, initializer_range=0.15,
    )).save_pretrained(folder)
    return save_byte_tokenizer(folder)
