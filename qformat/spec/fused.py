"""Fused groups: sibling modules that serving engines run as one matrix and that must therefore be quantized alike.

vLLM fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (its `packed_modules_mapping`); a checkpoint whose
fused shards differ in scheme or fallback status fails to load there ("Found different quantization schemes for the
shards ..."). transformers exposes no such map, so qformat keeps a table per `model_type`. Entries are tuples of leaf
names that share a parent module; `DEFAULT_FUSED_GROUPS` is used for model types not in the table and covers the
naming conventions of the architectures transformers ships.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping

__all__ = [
    "DEFAULT_FUSED_GROUPS",
    "FUSED_GROUPS_BY_MODEL_TYPE",
    "FusedGroups",
    "fused_groups_for",
    "fused_mismatch",
    "group_modules",
]

FusedGroups = tuple[tuple[str, ...], ...]

_QKV = ("q_proj", "k_proj", "v_proj")
_GATE_UP = ("gate_proj", "up_proj")
_BERT_QKV = ("query", "key", "value")

#: Used for any model_type not listed below: every naming convention of the table at once.
DEFAULT_FUSED_GROUPS: FusedGroups = (_QKV, _GATE_UP, _BERT_QKV, ("w1", "w3"))

FUSED_GROUPS_BY_MODEL_TYPE: dict[str, FusedGroups] = {
    # decoder-only LLMs: vLLM's qkv_proj + gate_up_proj
    **{t: (_QKV, _GATE_UP) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo",
                                     "olmo2", "granite", "stablelm", "starcoder2", "cohere", "exaone", "internlm2")},
    "opt": (_QKV,),
    # encoder-decoder: self-attention and cross-attention both fuse q/k/v in vLLM's BART
    "bart": (_QKV,),
    "mbart": (_QKV,),
    "marian": (_QKV,),
    # BERT family: vLLM's BertModel fuses query/key/value into qkv_proj
    **{t: (_BERT_QKV,) for t in ("bert", "roberta", "xlm-roberta", "camembert", "electra")},
}


def fused_groups_for(model_type: str | None) -> FusedGroups:
    """The fused-group table entry for `model_type` (the default table if the type is not listed)."""
    return FUSED_GROUPS_BY_MODEL_TYPE.get(model_type or "", DEFAULT_FUSED_GROUPS)


def group_modules(module_names: Iterable[str], groups: FusedGroups) -> list[tuple[str, ...]]:
    """Find the fused groups among `module_names`.

    A group is formed by the members of one table entry that share a parent ("a.b.q_proj", "a.b.k_proj", ...). Only
    groups with at least two members present are returned, in the order their first member appears.
    """
    leaves_by_parent: dict[str, dict[str, str]] = defaultdict(dict)
    order: list[str] = []
    for name in module_names:
        parent, _, leaf = name.rpartition(".")
        if parent not in leaves_by_parent:
            order.append(parent)
        leaves_by_parent[parent][leaf] = name
    found: list[tuple[str, ...]] = []
    for parent in order:
        leaves = leaves_by_parent[parent]
        for entry in groups:
            members = tuple(leaves[leaf] for leaf in entry if leaf in leaves)
            if len(members) >= 2:
                found.append(members)
    return found


def fused_mismatch(groups: Iterable[tuple[str, ...]], kinds: Mapping[str, Hashable]) -> tuple[str, ...] | None:
    """The first of `groups` (from `group_modules`) whose members differ, or None when every group agrees.

    The rule (docs/FORMAT.md section 10): the members of a fused group share one scheme and one fallback status.
    `kinds` maps every member to what must agree: its scheme (or what stands for it, such as a scheme name), None
    for a module kept in full precision. A planner that can still choose keeps the whole group when one member is
    kept, then refuses what is left; an importer or exporter, which cannot, refuses every mismatch.
    """
    for group in groups:
        if len({kinds[m] for m in group}) > 1:
            return group
    return None
