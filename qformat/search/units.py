"""Units of a fallback search: the quantized Linear modules, one unit per fused group (q/k/v, gate/up), since a
serving engine runs a fused group as one matrix and the plan keeps or quantizes a group as a whole."""

from __future__ import annotations

from dataclasses import dataclass

from qformat.models.structure import LinearModule
from qformat.plan.rules import ConversionPlan
from qformat.spec.fused import group_modules

__all__ = ["Unit", "units_of"]


@dataclass(frozen=True)
class Unit:
    """One or more Linear modules that fall back together; `name` is the first member's checkpoint name."""

    members: tuple[LinearModule, ...]

    @property
    def name(self) -> str:
        return self.members[0].name

    @property
    def label(self) -> str:
        """The unit as a person reads it: "model.layers.0.self_attn.{q,k,v}_proj"-style for a group."""
        if len(self.members) == 1:
            return self.name
        return self.name + " (+" + ", ".join(m.name.rsplit(".", 1)[-1] for m in self.members[1:]) + ")"


def units_of(plan: ConversionPlan) -> list[Unit]:
    """The quantized modules of `plan` grouped into units, in module order."""
    quantized = [d.module.name for d in plan.quantized]
    groups = {n: g for g in group_modules(list(plan.structure.linears), plan.fused_groups) for n in g}
    units, seen = [], set()
    for name in quantized:
        if name in seen:
            continue
        members = groups.get(name, (name,))
        seen.update(members)
        units.append(Unit(tuple(plan.decisions[n].module for n in members if n in plan.decisions)))
    return units
