"""``beyondlora sample`` on the built-in demo: an adapter's images differ from the base's, the same seed
gives the same image, and multiplier 0 reproduces the base model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

import beyondlora as bl
from beyondlora.cli import main
from beyondlora.training.models import load_base_model


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_sample_on_the_demo(tmp_path: Path) -> None:
    base = load_base_model("demo", torch.device("cpu"))
    torch.manual_seed(0)
    bl.get_peft_model(base.unet, bl.LoKrConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_weights=False))
    adapter = tmp_path / "adapter.safetensors"
    bl.save_adapter(base.pipe, adapter)

    def run(folder: str, *extra: str) -> Path:
        argv = ["sample", "--prompt", "a yellow cross", "--seeds", "0", "1", "--steps", "4"]
        assert main([*argv, "--output-dir", str(tmp_path / folder), *extra]) == 0
        return tmp_path / folder

    plain = run("base")
    adapted = run("adapted", "--adapter", str(adapter))
    again = run("again", "--adapter", str(adapter))
    off = run("off", "--adapter", str(adapter), "--multiplier", "0")
    names = sorted(p.name for p in plain.iterdir())
    assert names == ["grid.png", "p0_s0.png", "p0_s1.png"]
    for name in ("p0_s0.png", "p0_s1.png"):
        assert np.abs(_pixels(adapted / name) - _pixels(plain / name)).max() > 0  # the adapter acts
        assert np.array_equal(_pixels(again / name), _pixels(adapted / name))  # same seed, same image
        assert np.array_equal(_pixels(off / name), _pixels(plain / name))  # strength 0 is the base
    assert not np.array_equal(_pixels(plain / "p0_s0.png"), _pixels(plain / "p0_s1.png"))  # seeds differ
