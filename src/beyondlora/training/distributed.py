"""One process or many, on Hugging Face accelerate.

``torchrun --nproc_per_node N -m beyondlora train …`` and ``accelerate launch -m beyondlora train …`` set
the environment that :class:`accelerate.Accelerator` reads; alone, the same code runs as one process.
Accelerate owns the process group, the device, autocast and fp16 loss scaling; the adapted models are
wrapped in DDP (only their trainable parameters take part: the frozen base is neither broadcast nor
reduced).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from .settings import TrainConfigError

#: how long a process waits in a collective; the main process may sample or write a grid meanwhile
COLLECTIVE_TIMEOUT = timedelta(hours=1)


def wants_cuda() -> bool:
    """Train on the GPU when there is one (``BEYONDLORA_CPU=1`` or ``accelerate launch --cpu`` force the CPU)."""
    from accelerate.utils import parse_flag_from_env

    forced = os.environ.get("BEYONDLORA_CPU", "") == "1" or parse_flag_from_env("ACCELERATE_USE_CPU")
    return torch.cuda.is_available() and not forced


class Engine:
    """The run's :class:`accelerate.Accelerator` and the few collective operations the trainer needs.

    ``mixed_precision``: ``no``/``fp16``/``bf16``, or ``None`` for accelerate's own setting
    (``accelerate launch --mixed_precision``, its config file), else ``no``.  Raises
    :class:`TrainConfigError` for fp16 on a CPU and for accelerate setups other than plain data parallel.
    """

    def __init__(self, mixed_precision: str | None = None) -> None:
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState
        from accelerate.utils import DistributedType, InitProcessGroupKwargs

        self._owns_group = not torch.distributed.is_initialized()
        try:
            self.accelerator = Accelerator(
                mixed_precision=mixed_precision,
                cpu=not wants_cuda(),
                device_placement=False,  # the trainer places the models itself, the frozen parts in their dtype
                kwargs_handlers=[InitProcessGroupKwargs(timeout=COLLECTIVE_TIMEOUT)],
            )
        except BaseException:
            AcceleratorState._reset_state(reset_partial_state=True)
            raise
        kind = self.accelerator.distributed_type
        problem = None
        if kind not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
            problem = f"accelerate is set up for {kind.value}; beyondlora train runs data-parallel (DDP) only"
        elif self.mixed_precision == "fp16" and self.device.type == "cpu":
            problem = "mixed precision fp16 needs a GPU (set by --mixed-precision or accelerate); on CPU use bf16 or no"
        if problem:
            self.close()
            raise TrainConfigError(problem)

    @property
    def mixed_precision(self) -> str:
        """The precision in effect: ``no``, ``fp16`` or ``bf16``."""
        return self.accelerator.mixed_precision

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def describe(self) -> str:
        """How the processes are joined, e.g. ``MULTI_CPU, gloo``."""
        return f"{self.accelerator.distributed_type.value}, {torch.distributed.get_backend()}"

    def prepare_model(self, model: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """``model`` ready to train: DDP over its trainable parameters when there are several processes.

        ``find_unused_parameters``: some of its trainable parameters get no gradient (SDXL's first text
        encoder never uses its last layer); DDP then looks for them after each forward and leaves their
        gradient ``None``, as a single process does.

        DDP starts every process from the main process' trainable parameters.  The frozen parameters and
        the buffers are registered as ignored, so DDP neither broadcasts the base model at start nor syncs
        its buffers on each forward.
        """
        if self.world > 1:
            frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
            frozen += [name for name, _ in model.named_buffers()]
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
        from accelerate.utils import DistributedDataParallelKwargs

        # the DDP options of the next prepare_model call: the handler accelerate reads there
        self.accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
        return self.accelerator.prepare_model(model)

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """The optimizer behind accelerate's wrapper, which applies fp16 loss scaling when active."""
        return self.accelerator.prepare_optimizer(optimizer)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    @contextlib.contextmanager
    def no_sync(self, models: list[nn.Module], skip: bool) -> Iterator[None]:
        """Skip the gradient all-reduce for the backward inside (the first micro-batches of a step)."""
        with contextlib.ExitStack() as stack:
            if skip:
                for model in models:
                    stack.enter_context(self.accelerator.no_sync(model))
            yield

    def clip_grad_norm_(self, params: list[nn.Parameter], max_norm: float) -> None:
        """Clip the (unscaled, for fp16) gradients to ``max_norm``."""
        self.accelerator.clip_grad_norm_(params, max_norm)

    @property
    def scaler(self) -> Any:
        """The fp16 gradient scaler (its state is part of a checkpoint), or ``None``."""
        return self.accelerator.scaler

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def mean(self, value: float) -> float:
        """The mean over processes of one number."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        return self.accelerator.reduce(tensor, reduction="mean").item()

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true in some process (a signal reached one of them)."""
        if self.world == 1:
            return flag
        tensor = torch.tensor([int(flag)], device=self.device)
        return bool(self.accelerator.reduce(tensor, reduction="sum").item())

    def broadcast_text(self, text: str) -> str:
        """The main process' ``text``, in every process."""
        if self.world == 1:
            return text
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([text], from_process=0)[0]

    def close(self) -> None:
        """End the run: leave the process group if this run made it, and forget accelerate's shared state
        (accelerate keeps it per process; a later run in the same process may want another precision)."""
        from accelerate.state import AcceleratorState

        if self._owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        AcceleratorState._reset_state(reset_partial_state=True)
