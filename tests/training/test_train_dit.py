"""``beyondlora train`` on SD3 and Flux (the tiny offline pipelines): flow matching lowers the loss, the
adapter file loads back into a fresh pipeline, and a resumed or SIGTERM-stopped run equals one run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_train_config import make_dataset

import beyondlora as bl
from beyondlora.training.settings import TrainConfig
from beyondlora.training.trainer import INTERRUPTED, Trainer, train

MODELS = {"tiny-sd3": bl.tiny_sd3_pipeline, "tiny-flux": bl.tiny_flux_pipeline}


def options(model: str, data: Path, out: Path, **changes: Any) -> TrainConfig:
    values: dict[str, Any] = dict(
        pretrained_model=model,
        train_data_dir=str(data),
        output_dir=str(out),
        batch_size=2,
        max_steps=4,
        save_every=2,
        sample_seeds=[0],
        sample_steps=2,
        algo="lora",
        rank=4,
        learning_rate=3e-3,
    )
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _transformer_output(pipe: Any, model: str) -> torch.Tensor:
    torch.manual_seed(1)
    transformer = pipe.transformer
    states = torch.randn(1, 6, transformer.config.joint_attention_dim)
    pooled = torch.randn(1, transformer.config.pooled_projection_dim)
    if model == "tiny-flux":
        return transformer(
            hidden_states=torch.randn(1, 16, 16),
            timestep=torch.tensor([0.5]),
            guidance=torch.tensor([1.0]),
            pooled_projections=pooled,
            encoder_hidden_states=states,
            txt_ids=torch.zeros(6, 3),
            img_ids=torch.zeros(16, 3),
        ).sample
    return transformer(
        hidden_states=torch.randn(1, 4, 8, 8),
        timestep=torch.tensor([500.0]),
        encoder_hidden_states=states,
        pooled_projections=pooled,
    ).sample


@pytest.mark.parametrize("model", sorted(MODELS))
def test_flow_matching_lowers_the_loss_and_the_file_loads(model: str, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = options(model, data, out, algo="lokr", max_steps=30, save_every=0)
    assert train(config) == 0
    losses = _losses(out)
    assert len(losses) == 30 and sum(losses[-10:]) < 0.95 * sum(losses[:10]), losses
    pipe = MODELS[model]()
    plain = _transformer_output(pipe, model)
    bl.load_adapter(pipe, out / "adapter.safetensors", strict=True)
    assert (_transformer_output(pipe, model) - plain).abs().max() > 1e-4


@pytest.mark.parametrize("model", sorted(MODELS))
def test_resume_and_sigterm_equal_one_run(
    model: str, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reference = tmp_path / "one"
    assert train(options(model, data, reference)) == 0
    halves = tmp_path / "halves"
    assert train(options(model, data, halves, max_steps=2)) == 0
    assert train(options(model, data, halves, resume=True)) == 0
    original = Trainer._loss

    def loss_then_signal(self: Trainer, step: int, *args: Any) -> torch.Tensor:
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step, *args)

    stopped = tmp_path / "stopped"
    monkeypatch.setattr(Trainer, "_loss", loss_then_signal)
    assert train(options(model, data, stopped)) == INTERRUPTED
    monkeypatch.setattr(Trainer, "_loss", original)
    assert train(options(model, data, stopped, resume=True)) == 0
    first = load_file(str(reference / "adapter.safetensors"))
    for run in (halves, stopped):
        other = load_file(str(run / "adapter.safetensors"))
        assert first.keys() == other.keys()
        assert all(torch.equal(first[k], other[k]) for k in first), run.name
        assert _losses(run) == _losses(reference)


def test_text_encoders_of_a_dit_are_not_trained(data: Path, tmp_path: Path) -> None:
    from beyondlora.training.settings import TrainConfigError

    with pytest.raises(TrainConfigError, match="SD 1.x/2.x/SDXL only"):
        train(options("tiny-flux", data, tmp_path / "te", train_text_encoder=True))
