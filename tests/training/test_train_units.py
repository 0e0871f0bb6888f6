"""Pieces of ``beyondlora train`` checked against direct computations: flags, schedules, min-SNR weights,
crops into buckets."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from beyondlora.training.data import Item, load_pixels
from beyondlora.training.noise_prediction import min_snr_weights
from beyondlora.training.optimization import lr_factor
from beyondlora.training.report import loss_axis, nice_ticks
from beyondlora.training.settings import TrainConfig, add_arguments, config_from_args, options


def test_every_option_is_a_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert {f.name for f in options()} <= flags
    args = parser.parse_args(["--no-cache-latents", "--sample-seeds", "5", "6", "--alpha", "2", "--algo", "loha"])
    config = config_from_args(args)
    assert (config.cache_latents, config.sample_seeds, config.alpha, config.algo) == (False, [5, 6], 2.0, "loha")
    assert config_from_args(parser.parse_args([])) == TrainConfig()


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_schedules_with_warmup(schedule: str) -> None:
    config = TrainConfig(lr_scheduler=schedule, warmup_steps=4, max_steps=24)
    factor = lr_factor(config)
    assert [factor(s) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    for step in range(4, 24):
        progress = (step - 4) / 20
        expected = {"constant": 1.0, "cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress}
        assert factor(step) == pytest.approx(expected[schedule])


def test_min_snr_weights_from_the_betas() -> None:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    timesteps = torch.tensor([0, 10, 100, 500, 999])
    for prediction in ("epsilon", "v_prediction"):
        weights = min_snr_weights(alphas_cumprod, timesteps, 5.0, prediction)
        for weight, t in zip(weights.tolist(), timesteps.tolist(), strict=True):
            a = math.prod(1 - b for b in betas[: t + 1].tolist())
            snr = a / (1 - a)
            expected = min(snr, 5.0) / (snr if prediction == "epsilon" else snr + 1)
            assert weight == pytest.approx(expected, rel=1e-9)
    assert min_snr_weights(alphas_cumprod, torch.tensor([999]), 5.0, "epsilon").item() == pytest.approx(1.0)


def test_wide_image_is_resized_to_cover_and_centre_cropped(tmp_path: Path) -> None:
    array = np.zeros((32, 64, 3), dtype=np.uint8)
    array[:, :16] = 255  # white left quarter
    Image.fromarray(array).save(tmp_path / "wide.png")
    item = Item(tmp_path / "wide.png", "x", size=(64, 32))
    centre = load_pixels(item, (32, 32))
    assert centre.shape == (3, 32, 32)
    assert centre.max() < -0.9  # the centre half has no white
    left = load_pixels(item, (32, 32), crop=(0.0, 0.5))
    assert left[:, :, :14].min() > 0.9 and left[:, :, 18:].max() < -0.9
    same = load_pixels(item, (64, 32))
    assert torch.equal(same, torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1)


def test_latent_cache_on_disk_is_reused_only_for_the_same_images_and_model(tmp_path: Path) -> None:
    from test_train_config import make_dataset

    from beyondlora.training.data import BucketDataset, LatentCache, scan_dataset

    items = scan_dataset(make_dataset(tmp_path / "data", count=2))
    dataset = BucketDataset(items, 64, 8, enable_bucket=True)
    calls: list[int] = []

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return pixels[:, :, ::8, ::8] * 2

    path = tmp_path / "cache.safetensors"
    first = LatentCache(dataset, encode, flips=True, path=path, model="a")
    assert len(calls) == 4 and path.is_file()  # two images, each plain and mirrored
    again = LatentCache(dataset, encode, flips=True, path=path, model="a")
    assert len(calls) == 4 and all(torch.equal(first.latents[k], again.latents[k]) for k in first.latents)
    expected = load_pixels(items[1], dataset.bucket_of[1]).flip(-1)[:, ::8, ::8] * 2
    assert torch.equal(again.get(1, True), expected)
    LatentCache(dataset, encode, flips=True, path=path, model="b")
    assert len(calls) == 8  # another base model: encoded afresh


def test_loss_curve_axes() -> None:
    assert nice_ticks(0.013, 0.11) == [0.02, 0.04, 0.06, 0.08, 0.1]
    assert nice_ticks(0, 200) == [0, 50, 100, 150, 200]
    assert nice_ticks(1, 200) == [50, 100, 150, 200]
    assert loss_axis([0.02, 0.05, 0.11]) == (False, [0.02, 0.04, 0.06, 0.08, 0.1])
    assert loss_axis([0.5, 0.03, 0.001]) == (True, [0.001, 0.01, 0.1])  # three decades: log scale
    assert loss_axis([0.9, 0.004]) == (True, [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5])


def test_help_shows_every_default() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    helps = {a.dest: a.help or "" for a in parser._actions}
    for f in options():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is not None and default != []:
            shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
            assert f"default: {shown}" in helps[f.name] or "default" in helps[f.name], f.name
    assert "(default: lokr)" in helps["algo"]
    # the defaults decided by the model and the algorithm say how
    assert "lokr 0.001" in helps["learning_rate"] and "lora 0.0001" in helps["learning_rate"]
    assert "4× that on the demo" in helps["learning_rate"] and "1 on SDXL" in helps["batch_size"]


@pytest.mark.parametrize(
    ("algo", "demo", "expected"),
    [("lokr", True, 4e-3), ("lokr", False, 1e-3), ("lora", False, 1e-4), ("ia3", True, 2e-2)],
)
def test_learning_rate_by_algorithm_and_model(algo: str, demo: bool, expected: float) -> None:
    config = TrainConfig(algo=algo)
    config.fill_model_defaults(is_demo=demo, batch_size=2, resolution=512)
    assert config.learning_rate == pytest.approx(expected)
    assert (config.batch_size, config.resolution) == (2, 512)
    given = TrainConfig(algo=algo, learning_rate=0.5, batch_size=3, resolution=256)
    given.fill_model_defaults(is_demo=demo, batch_size=2, resolution=512)
    assert (given.learning_rate, given.batch_size, given.resolution) == (0.5, 3, 256)
