"""Checkpoints that resume bit for bit, written atomically, and the per-step metrics file.

A checkpoint is a folder ``checkpoints/step-NNNNNN`` holding the trainable parameters
(``trainable.safetensors``), the optimizer's and the learning-rate scheduler's states, the global RNG
states and the step and data position (``state.pt``).  It is written under a temporary name and renamed
into place, so a run killed at any moment leaves only complete checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .settings import TrainConfigError

_NAME = re.compile(r"^step-(\d{6,})$")


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in folder.iterdir() if (m := _NAME.match(path.name))]
    return [path for _, path in sorted(found)]


def rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    output_dir: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    data_position: int,
    keep: int,
    scaler: Any = None,
    seconds: float = 0.0,
) -> Path:
    """Write the checkpoint of ``step`` atomically and keep only the newest ``keep``.  ``scaler``: the
    fp16 gradient scaler, whose scale is part of the training state; ``seconds``: the run's time so far, over
    every session that led to this step (a resumed run reports its whole time)."""
    folder = output_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:06d}"
    temporary = Path(tempfile.mkdtemp(prefix=f".step-{step:06d}.", dir=folder))
    try:
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(temporary / "trainable.safetensors")
        )
        torch.save(optimizer.state_dict(), temporary / "optimizer.pt")
        state = {
            "step": step,
            "data_position": data_position,
            "scheduler": scheduler.state_dict(),
            "rng": rng_states(),
            "seconds": seconds,
        }
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        torch.save(state, temporary / "state.pt")
        for path in temporary.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    output_dir: Path,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any = None,
) -> tuple[int, int, float]:
    """Restore the latest checkpoint in place; returns (step, data position, the run's seconds so far)."""
    found = checkpoint_dirs(output_dir)
    if not found:
        raise TrainConfigError(f"--resume: no checkpoint in {output_dir / 'checkpoints'}")
    latest = found[-1]
    saved = load_file(str(latest / "trainable.safetensors"))
    if set(saved) != set(trainable):
        missing = sorted(set(trainable) ^ set(saved))[:5]
        raise TrainConfigError(
            f"--resume: {latest} was trained with another network (differs in {missing}); use the options of that run"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(saved[name])
    # onto the CPU: every process would otherwise put the main process' GPU state on its GPU 0; the
    # optimizer moves its state to the parameters' device
    optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=True, map_location="cpu"))
    state = torch.load(latest / "state.pt", weights_only=False)
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    set_rng_states(state["rng"])
    return int(state["step"]), int(state["data_position"]), float(state.get("seconds", 0.0))


class MetricsLog:
    """``metrics.jsonl``: one JSON object per optimizer step; a resumed run drops lines past its step."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        self.steps: list[int] = []
        self.losses: list[float] = []
        kept = []
        if resume_step is not None and path.is_file():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
                    self.steps.append(record["step"])
                    self.losses.append(record["loss"])
        path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        self.steps.append(record["step"])
        self.losses.append(record["loss"])
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
