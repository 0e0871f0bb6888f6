"""``beyondlora evaluate`` on Stable Diffusion pipelines (the offline tiny SD 1.x, SDXL, SD3 and Flux ones, VAE and all)
with a trigger and no training images: the metrics that need them are skipped and say so."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import beyondlora as bl
from beyondlora.evaluation.command import evaluate

PIPELINES = {
    "tiny-sd": bl.tiny_sd_pipeline,
    "tiny-sdxl": bl.tiny_sdxl_pipeline,
    "tiny-sd3": bl.tiny_sd3_pipeline,
    "tiny-flux": bl.tiny_flux_pipeline,
}


@pytest.mark.parametrize(
    "model, algorithm", [("tiny-sd", "lora"), ("tiny-sdxl", "loha"), ("tiny-sd3", "lora"), ("tiny-flux", "loha")]
)
def test_tiny_sd_without_training_images(tmp_path: Path, model: str, algorithm: str) -> None:
    pipe = PIPELINES[model]()
    config = bl.LoraConfig if algorithm == "lora" else bl.LoHaConfig
    torch.manual_seed(0)
    denoiser = "unet" if hasattr(pipe, "unet") else "transformer"
    adapted = bl.get_peft_model(
        getattr(pipe, denoiser), config(r=2, target_modules=["to_q", "to_v"], init_weights=False)
    )
    setattr(pipe, denoiser, adapted)
    adapter = tmp_path / f"{algorithm}.safetensors"
    bl.save_adapter(pipe, adapter)
    lines: list[str] = []
    result = evaluate(
        model,
        [str(adapter)],
        trigger="sks dog",
        images=2,
        steps=2,
        prompt_types=("train", "trigger", "style"),
        output_dir=tmp_path / "out",
        echo=lines.append,
    )
    assert "skipped: prompt type 'train' needs the training captions: pass --data DIR" in lines
    assert any(line.startswith("skipped: image_similarity, centroid_distance") and "--data" in line for line in lines)
    with open(tmp_path / "out" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["prompt_type"] for r in rows} == {"trigger", "style"}
    assert {r["algorithm"] for r in rows} == {"base", algorithm}
    pixels = {(r["model"].split("-")[0], r["prompt_type"], r["metric"]): r for r in rows if r["features"] == "pixels"}
    assert pixels[(algorithm, "trigger", "image_similarity")]["value"] == ""
    assert "--data" in pixels[(algorithm, "trigger", "image_similarity")]["note"]
    assert float(pixels[(algorithm, "trigger", "vendi")]["value"]) >= 1.0
    assert float(pixels[(algorithm, "style", "preservation")]["value"]) < 1.0  # a random LoRA changes the images
    grid = (tmp_path / "out" / "grids" / "style.png").stat().st_size
    assert grid > 0 and result.means["base"] >= 0.0
