"""Several processes (``torchrun`` / ``accelerate launch``: ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) or one.

Data-parallel by hand: every process starts from the main process' adapter, computes its share of each
global batch, and the gradients of the trainable parameters are averaged with one all-reduce each before
the (identical) optimizer steps — the arithmetic of DDP without wrapping the model, so adapters that
leave some parameters unused in a step (DyLoRA, module dropout) need no special mode.  Gloo on CPU,
NCCL on GPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    @classmethod
    def from_environment(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and os.environ.get("BEYONDLORA_CPU", "") != "1"
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        owns = False
        if world > 1 and not tdist.is_initialized():
            tdist.init_process_group("nccl" if cuda else "gloo")
            owns = True
        return cls(rank, world, device, owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            tdist.barrier()

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        tdist.all_reduce(tensor)
        return tensor.item() / self.world

    def any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        tdist.all_reduce(tensor)
        return bool(tensor.item())

    def broadcast_parameters(self, params: list[torch.nn.Parameter]) -> None:
        if self.world > 1:
            with torch.no_grad():
                for param in params:
                    tdist.broadcast(param.data, src=0)

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            tdist.all_reduce(param.grad)
            param.grad.div_(self.world)

    def broadcast_text(self, text: str) -> str:
        if self.world == 1:
            return text
        holder = [text]
        tdist.broadcast_object_list(holder, src=0)
        return holder[0]

    def close(self) -> None:
        if self.owns_group and tdist.is_initialized():
            tdist.destroy_process_group()
