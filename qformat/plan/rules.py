"""Decide, for every Linear module, its scheme or why it stays in full precision.

Order of decisions (docs/FORMAT.md, "Resolving a module's scheme"):
1. the output embedding is kept (reason `default`) unless an exact-name override asks for it; a tied one always is;
2. `--ignore` patterns keep a module (reason `user`), and so does an override to "none";
   a module a fallback search chose is kept with the search's entry (reason `sensitivity`);
3. otherwise the module takes its override's scheme (exact name first, then the first matching `re:` pattern) or
   the default scheme;
4. a module whose shape no kernel of its scheme takes is kept (reason `shape`);
5. fused groups (q/k/v, gate/up) must agree: if one member is kept, all are (reason `fused`); members with
   different schemes are an error the user must resolve.
The resulting config is checked to resolve every module back to the same decision.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

from qformat.plan.recipe import FULL_PRECISION, QuantRecipe
from qformat.models.structure import LinearModule, ModelStructure
from qformat.errors import OptionError
from qformat.spec.config import FallbackEntry, CheckpointConfig
from qformat.spec.fused import FusedGroups, fused_groups_for, fused_mismatch, group_modules
from qformat.spec.layout import shape_problem
from qformat.spec.patterns import REGEX_PREFIX, PatternSet, RuleSet, pattern_matches
from qformat.spec.schemes import Scheme

__all__ = ["ConversionPlan", "ModuleDecision", "default_fallback", "plan_conversion"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleDecision:
    """One Linear module's fate: quantized with `scheme_name`, or kept with `fallback`."""

    module: LinearModule
    scheme_name: str | None = None
    scheme: Scheme | None = None
    observer: str | None = None
    fallback: FallbackEntry | None = None

    @property
    def quantized(self) -> bool:
        return self.fallback is None


@dataclass(frozen=True)
class ConversionPlan:
    """Every module's decision plus the config rules (schemes, overrides, fused table) that express them."""

    structure: ModelStructure
    decisions: dict[str, ModuleDecision]
    schemes: dict[str, Scheme]
    default_scheme: str
    overrides: tuple[tuple[str, str], ...]
    fused_groups: FusedGroups

    @property
    def fallback(self) -> tuple[FallbackEntry, ...]:
        return tuple(d.fallback for d in self.decisions.values() if d.fallback is not None)

    @property
    def quantized(self) -> list[ModuleDecision]:
        return [d for d in self.decisions.values() if d.quantized]

    def config(self, **extra: object) -> CheckpointConfig:
        return CheckpointConfig(
            schemes=self.schemes,
            default_scheme=self.default_scheme,
            overrides=self.overrides,
            fallback=self.fallback,
            fused_groups=self.fused_groups,
            **extra,  # type: ignore[arg-type]
        )


def _check_exact_names(patterns: list[str], names: set[str], flag: str) -> None:
    for pattern in patterns:
        if pattern.startswith(REGEX_PREFIX):
            if not any(pattern_matches(pattern, n) for n in names):  # bounded: a slow pattern is refused
                logger.warning("%s %s matches no Linear module", flag, pattern)
        elif pattern not in names:
            raise OptionError(
                f"{flag} {pattern}: the model has no Linear module with that name; check it (names look like "
                "model.layers.0.mlp.down_proj) or use a 're:' pattern"
            )


def default_fallback(module: LinearModule, *, exact_override: bool = False) -> FallbackEntry | None:
    """The entry qformat's defaults keep `module` with (reason `default`), or None where they leave it to the user.

    A tied output embedding and a module absent from the source checkpoint are always kept; the output embedding is
    kept unless an exact-name override asks for it (`exact_override`). The import of a compressed-tensors checkpoint
    words the modules it keeps with the same entries.
    """
    name = module.name
    if module.tied:
        return FallbackEntry(module=name, reason="default", detail="output embedding tied to the input embeddings")
    if not module.in_checkpoint:
        return FallbackEntry(module=name, reason="default",
                             detail="not in the source checkpoint (transformers initializes it)")
    if module.output_embedding and not exact_override:
        return FallbackEntry(module=name, reason="default", detail="output embedding kept in full precision by default")
    return None


def _initial(module: LinearModule, options: QuantRecipe, overrides: RuleSet[str],
             ignore: PatternSet, searched: Mapping[str, FallbackEntry]) -> ModuleDecision:
    name = module.name
    rule = overrides.first(name)
    exact_rule = rule is not None and rule[0] == name
    if module.tied and exact_rule and rule[1] != FULL_PRECISION:
        raise OptionError(f"{name} is tied to the input embeddings and cannot be quantized; drop the override for it")
    fallback = default_fallback(module, exact_override=exact_rule)
    if fallback is not None:
        return ModuleDecision(module, fallback=fallback)
    pattern = ignore.matching(name)
    if pattern is not None:
        return ModuleDecision(module, fallback=FallbackEntry(module=name, reason="user", detail=f"--ignore {pattern}"))
    if rule is not None and rule[1] == FULL_PRECISION:
        return ModuleDecision(module, fallback=FallbackEntry(
            module=name, reason="user", detail=f"--override {rule[0]}={FULL_PRECISION}"))
    if name in searched:
        return ModuleDecision(module, fallback=searched[name])
    scheme_name = rule[1] if rule is not None else options.default_scheme
    scheme = options.schemes[scheme_name]
    problem = shape_problem(scheme, module.out_features, module.in_features)
    if problem is not None:
        return ModuleDecision(module, fallback=FallbackEntry(module=name, reason="shape", detail=problem))
    return ModuleDecision(module, scheme_name, scheme, options.observer_for(scheme))


def _enforce_fused(decisions: dict[str, ModuleDecision], groups: list[tuple[str, ...]]) -> None:
    for group in groups:
        members = [decisions[n] for n in group]
        kept = [d for d in members if not d.quantized]
        if kept and len(kept) < len(members):
            cause = kept[0].fallback
            for d in members:
                if d.quantized:
                    decisions[d.module.name] = ModuleDecision(d.module, fallback=FallbackEntry(
                        module=d.module.name, reason="fused",
                        detail=f"fused with {cause.module} ({cause.reason}), which is kept"))
    # every group is now all kept or all quantized: what still differs is the scheme
    group = fused_mismatch(groups, {n: decisions[n].scheme_name for g in groups for n in g})
    if group is not None:
        listing = ", ".join(f"{n}={decisions[n].scheme_name}" for n in group)
        raise OptionError(
            f"fused modules must share one scheme (serving engines run them as one matrix), got {listing}; "
            "make your overrides cover the whole group"
        )


def plan_conversion(structure: ModelStructure, options: QuantRecipe,
                    searched: Mapping[str, FallbackEntry] | None = None) -> ConversionPlan:
    """Decide every Linear module of `structure` under `options` (see the module docstring for the rules).
    `searched`: the modules a fallback search chose to keep (`qformat.search`), by checkpoint name."""
    searched = searched or {}
    unknown = sorted(set(searched) - set(structure.linears))
    if unknown:
        raise OptionError(f"the fallback search named {unknown[0]}, which is not a Linear module of this model")
    names = set(structure.linears)
    _check_exact_names(list(options.ignore), names, "--ignore")
    _check_exact_names([p for p, _ in options.overrides], names, "--override")
    overrides = [(p, options.canonical_override(s)) for p, s in options.overrides]
    rules = RuleSet(overrides, what="--override")
    ignore = PatternSet(options.ignore, what="--ignore")
    decisions = {name: _initial(m, options, rules, ignore, searched) for name, m in structure.linears.items()}
    table = fused_groups_for(structure.model_type)
    _enforce_fused(decisions, group_modules(list(structure.linears), table))
    scheme_overrides = tuple((p, s) for p, s in overrides if s != FULL_PRECISION)
    plan = ConversionPlan(structure, decisions, options.schemes, options.default_scheme, scheme_overrides, table)
    config = plan.config()
    for name, decision in decisions.items():  # the config must say exactly what was decided
        resolved = config.scheme_for(name)
        assert (resolved is None) == (not decision.quantized), name
        assert resolved is None or resolved[0] == decision.scheme_name, name
    return plan
