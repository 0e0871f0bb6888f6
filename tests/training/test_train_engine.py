"""The trainer's optional engines: bf16 autocast through accelerate, Prodigy and bitsandbytes' 8-bit AdamW
(each resuming bit for bit), TensorBoard logs, fp16 refused on CPU before any work and trained on a GPU.

The trainer runs on :data:`helpers.layer_cases.DEVICE`: the CPU, or a GPU under ``BEYONDLORA_TEST_DEVICE=cuda``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_train_config import make_dataset
from test_train_run import options

from beyondlora.training.distributed import Engine
from beyondlora.training.optimization import make_optimizer
from beyondlora.training.settings import TrainConfig, TrainConfigError
from beyondlora.training.trainer import Trainer, train
from helpers.layer_cases import DEVICE


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def autocast_dtype() -> torch.dtype:
    kind = DEVICE.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32


def test_bf16_autocast_trains_float32_adapters(data: Path, tmp_path: Path, monkeypatch: Any) -> None:
    seen: list[torch.dtype] = []
    original = Trainer._loss

    def recording(self: Trainer, *args: Any) -> torch.Tensor:
        assert self.dist.device.type == DEVICE.type
        seen.append(autocast_dtype())
        with self.dist.autocast():
            seen.append(autocast_dtype())
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_loss", recording)
    half = tmp_path / "bf16"
    assert train(options(data, half, max_steps=2, save_every=0, mixed_precision="bf16")) == 0
    assert seen == [torch.float32, torch.bfloat16] * 2  # autocast inside the loss only
    monkeypatch.setattr(Trainer, "_loss", original)
    full = tmp_path / "fp32"
    assert train(options(data, full, max_steps=2, save_every=0)) == 0
    low, high = losses(half), losses(full)
    assert low != high  # the forward really ran in bfloat16 …
    assert low == pytest.approx(high, rel=0.05)  # … and computed the same loss to bf16 accuracy
    saved = load_file(str(half / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert all(tensor.dtype == torch.float32 for tensor in saved.values())  # float32 master weights


def test_fp16_trains_on_a_gpu_and_is_refused_on_cpu(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp16"
    if DEVICE.type == "cpu":
        with pytest.raises(TrainConfigError, match="fp16 needs a GPU"):
            train(options(data, out, mixed_precision="fp16"))
        assert not out.exists()
        return
    assert train(options(data, out, max_steps=3, mixed_precision="fp16")) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records)
    state = torch.load(out / "checkpoints" / "step-000003" / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0  # the loss scale a resume continues from
    saved = load_file(str(out / "adapter.safetensors"))
    assert all(tensor.dtype == torch.float32 and tensor.isfinite().all() for tensor in saved.values())


@pytest.mark.parametrize("optimizer", ["prodigy", "adamw8bit"])
def test_optional_optimizers_train_and_resume_bit_for_bit(data: Path, tmp_path: Path, optimizer: str) -> None:
    straight = tmp_path / "straight"
    settings: dict[str, Any] = dict(optimizer=optimizer, learning_rate=1.0 if optimizer == "prodigy" else 3e-3)
    assert train(options(data, straight, **settings)) == 0
    halves = tmp_path / "halves"
    assert train(options(data, halves, max_steps=2, **settings)) == 0
    assert train(options(data, halves, resume=True, **settings)) == 0
    first, second = load_file(str(straight / "adapter.safetensors")), load_file(str(halves / "adapter.safetensors"))
    assert first.keys() == second.keys()
    if DEVICE.type == "cpu":
        assert all(torch.equal(first[k], second[k]) for k in first)
    else:  # on an H100 the step after a resume differed in the last bits (max 3e-5 on AdamW), straight runs did not
        assert all(torch.allclose(first[k], second[k], rtol=1e-3, atol=1e-4) for k in first)
    state = torch.load(straight / "checkpoints" / "step-000004" / "optimizer.pt", weights_only=True)
    if optimizer == "prodigy":
        (group,) = state["param_groups"]
        assert group["d"] > group["d0"]  # Prodigy raised its step-size estimate from the starting d0
    else:
        assert all(any("bnb" in key for key in s) for s in state["state"].values())  # bitsandbytes' layout


def test_adamw8bit_keeps_large_states_in_eight_bits() -> None:
    """A layer-sized factor (bitsandbytes quantizes tensors of 4,096 elements and more) gets uint8 moments."""
    big = torch.nn.Parameter(torch.randn(320, 64, device=DEVICE))
    small = torch.nn.Parameter(torch.randn(8, 8, device=DEVICE))
    optimizer = make_optimizer(TrainConfig(optimizer="adamw8bit", learning_rate=1e-3), [big, small])
    for param in (big, small):
        param.grad = torch.randn_like(param)
    before = big.detach().clone()
    optimizer.step()
    assert optimizer.state[big]["state1"].dtype == torch.uint8
    assert optimizer.state[small]["state1"].dtype == torch.float32
    # the first AdamW step moves every weight by about lr (the update is m̂/√v̂ = ±1)
    step = (big.detach() - before).abs()
    assert step.mean().item() == pytest.approx(1e-3, rel=0.05)


def test_tensorboard_logs_match_the_metrics(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "logged"
    assert train(options(data, out, max_steps=3, save_every=0, lr_scheduler="linear")) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for tag in ("loss", "lr"):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [1, 2, 3]
        assert [e.value for e in logged] == pytest.approx([r[tag] for r in records], rel=1e-6)


def test_engine_runs_one_process_and_can_be_made_again() -> None:
    first = Engine("bf16")
    assert (first.world, first.rank, first.is_main, first.device.type) == (1, 0, True, DEVICE.type)
    assert first.mean(2.5) == 2.5 and first.any(False) is False and first.broadcast_text("x") == "x"
    first.close()
    second = Engine("no")  # accelerate's per-process state was released: another precision is allowed
    with second.autocast():
        assert not torch.is_autocast_enabled(DEVICE.type)
    second.close()


def test_checkpoint_keeps_the_fp16_loss_scale(tmp_path: Path) -> None:
    """The gradient scaler's scale and growth tracker are part of the state a resume must restore."""
    from beyondlora.training.resume import load_checkpoint, save_checkpoint

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    for grad in (1.0, float("inf"), 1.0):  # grow, back off on an overflow, grow
        optimizer.zero_grad()
        scaler.scale((param * grad).sum()).backward()
        scaler.step(optimizer)
        scaler.update()
    save_checkpoint(tmp_path, 3, {"p": param}, optimizer, scheduler, 3, keep=1, scaler=scaler)
    fresh = torch.amp.GradScaler("cpu", init_scale=1.0, growth_interval=1)
    assert load_checkpoint(tmp_path, {"p": param}, optimizer, scheduler, fresh)[:2] == (3, 3)
    assert fresh.state_dict() == scaler.state_dict() and fresh.get_scale() == 2048.0


def test_fp16_overflowing_steps_are_recorded_and_stop_the_run(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp16's loss scaling, driven on the CPU by giving accelerate a CPU GradScaler: a step whose gradients
    overflow is skipped, marked in metrics.jsonl, does not advance the schedule, and a run of such steps
    stops with a message."""
    import beyondlora.training.trainer as trainer_module

    original = Engine.__init__

    def with_scaler(self: Engine, *args: Any) -> None:
        original(self, *args)
        self.accelerator.scaler = torch.amp.GradScaler(DEVICE.type, init_scale=float("inf"))  # every gradient overflows

    monkeypatch.setattr(Engine, "__init__", with_scaler)
    monkeypatch.setattr(trainer_module, "MAX_SKIPPED_STEPS", 3)
    out = tmp_path / "overflow"
    config = options(data, out, max_steps=6, save_every=0, warmup_steps=2, max_grad_norm=0.0)
    with pytest.raises(ValueError, match="the last 3 steps had infinite or NaN gradients.*stopped at step 3"):
        train(config)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r.get("skipped")) for r in records] == [(1, True), (2, True), (3, True)]
    assert [r["lr"] for r in records] == pytest.approx([3e-3 / 3] * 3)  # still the first warm-up step


def test_accelerate_launch_settings_apply_unless_a_flag_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what accelerate launch --mixed_precision sets
    for flag, effective in ((None, "bf16"), ("no", "no")):
        engine = Engine(flag)
        assert engine.mixed_precision == effective
        engine.close()
    if DEVICE.type == "cpu":
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
        with pytest.raises(TrainConfigError, match="fp16 needs a GPU"):
            Engine(None)
        Engine("no").close()  # the failed engine left no accelerate state behind
