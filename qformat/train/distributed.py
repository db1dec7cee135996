"""Running `qformat distill` on one process or many, with PyTorch's own engine.

Under `torchrun` / `accelerate launch` (WORLD_SIZE > 1 in the environment) the process group is initialized from the
environment (NCCL on CUDA, gloo on CPU) and the student is wrapped in `DistributedDataParallel`, or with
`strategy="fsdp"` sharded with FSDP2's `fully_shard` per decoder block (for a model whose weights, gradients and
optimizer state do not fit one device). Each process takes its share of every global batch (`TrainData.batch`); the
loss terms are divided by their *global* item counts (summed across processes), so the averaged gradient is the
one-process gradient of the same global batch. Only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from qformat.errors import OptionError

__all__ = ["STRATEGIES", "Distributed", "setup_distributed"]

STRATEGIES = ("ddp", "fsdp")


@dataclass
class Distributed:
    """This process's place in the run: rank, world size, device, and whether it initialized the process group."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    strategy: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def all_sum(self, values: list[float]) -> list[float]:
        """`values` summed over every process (float64)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def wrap(self, model: nn.Module, blocks: list[nn.Module]) -> nn.Module:
        """The student as this strategy trains it (unchanged on one process)."""
        if not self.active:
            return model
        if self.strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            for block in blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The unsharded state dict of a model `wrap` sharded (a collective: every process calls it), on the CPU."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def setup_distributed(strategy: str = "ddp", device: str | None = None) -> Distributed:
    """Join the process group a launcher set up the environment for (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR),
    or run alone. Each process uses CUDA device LOCAL_RANK when CUDA is available (unless `device` says otherwise)."""
    if strategy not in STRATEGIES:
        raise OptionError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", "0") or 0)
    if device is None:
        dev = torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError):
            raise OptionError(f"--device must be cpu, cuda or cuda:N, got {device!r}") from None
        if dev.type not in ("cpu", "cuda"):
            raise OptionError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise OptionError("--device cuda: this torch sees no CUDA device; use --device cpu")
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local)
    use_cuda = dev.type == "cuda"
    if world <= 1:
        return Distributed(device=dev, strategy=strategy)
    import torch.distributed as dist

    owns = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    return Distributed(rank=rank, world=world, device=dev, owns_group=owns, strategy=strategy)
