"""The encoder-loading path on tiny random CLIP and DINOv2 folders, and an evaluation that uses both."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from beyondlora.evaluation.command import evaluate
from beyondlora.evaluation.encoders import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, ClipEncoder, DinoEncoder


def _pooled(output: object) -> torch.Tensor:
    # transformers 4 returns the tensor, 5 an output object holding it
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _normalised(images: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    resized = F.interpolate(images, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    return (resized - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_clip_folder_gives_the_models_own_embeddings(clip_folder: Path) -> None:
    from transformers import CLIPModel, CLIPTokenizer

    encoder = ClipEncoder(clip_folder)
    images = torch.rand(3, 3, 16, 16)
    features = encoder.encode(images)
    model = CLIPModel.from_pretrained(str(clip_folder)).eval()
    with torch.no_grad():
        expected = _pooled(model.get_image_features(pixel_values=_normalised(images, CLIP_MEAN, CLIP_STD)))
        tokens = CLIPTokenizer.from_pretrained(str(clip_folder))(["a dog", "a cat"], padding=True, return_tensors="pt")
        text = _pooled(model.get_text_features(**tokens))
    torch.testing.assert_close(features.vectors, expected, atol=1e-5, rtol=1e-5)
    assert features.tokens.shape == (3, 16, 32)  # (32 / 8)² patches of width 32
    torch.testing.assert_close(encoder.encode_text(["a dog", "a cat"]), text, atol=1e-5, rtol=1e-5)


def test_dino_folder_gives_its_class_and_patch_tokens(dino_folder: Path) -> None:
    from transformers import Dinov2Model

    encoder = DinoEncoder(dino_folder)
    images = torch.rand(2, 3, 16, 16)
    features = encoder.encode(images)
    model = Dinov2Model.from_pretrained(str(dino_folder)).eval()
    with torch.no_grad():
        hidden = model(pixel_values=_normalised(images, IMAGENET_MEAN, IMAGENET_STD)).last_hidden_state
    torch.testing.assert_close(features.vectors, hidden[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features.tokens, hidden[:, 1:], atol=1e-5, rtol=1e-5)


def test_bad_encoder_folders_are_named(tmp_path: Path, dino_folder: Path) -> None:
    with pytest.raises(ValueError, match=r"--clip .*missing.* does not exist"):
        ClipEncoder(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"--dino .*empty.* has no config.json"):
        (tmp_path / "empty").mkdir()
        DinoEncoder(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"--clip .* holds a 'dinov2' model, not a CLIPModel"):
        ClipEncoder(dino_folder)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text((dino_folder / "config.json").read_text())
    with pytest.raises(ValueError, match="--dino .*partial.*cannot load|--dino .*partial.*lack"):
        DinoEncoder(partial)


def test_evaluation_with_clip_and_dino(tmp_path: Path, clip_folder: Path, dino_folder: Path, random_adapter) -> None:
    result = evaluate(
        "demo",
        [str(random_adapter)],
        clip=str(clip_folder),
        dino=str(dino_folder),
        prompt_types=("trigger", "style"),
        images=3,
        steps=2,
        output_dir=tmp_path / "out",
        echo=lambda line: None,
    )
    with open(tmp_path / "out" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(result.rows)
    assert not [r for r in rows if r["value"] == ""]  # every encoder given: nothing skipped
    found = {(r["model"], r["prompt_type"], r["metric"], r["features"]) for r in rows}
    adapter = f"random-{result.rows[-1].model.split('-')[-1]}"
    for features in ("clip", "dino", "pixels"):
        assert (adapter, "style", "preservation", features) in found
        assert (adapter, "trigger", "image_similarity", features) in found
    assert (adapter, "trigger", "text_similarity", "clip") in found and (adapter, "style", "quality", "clip") in found
    values = {(r["model"], r["prompt_type"], r["metric"], r["features"]): float(r["value"]) for r in rows}
    assert values[("base", "style", "preservation", "dino")] == pytest.approx(1.0)
    assert -1.0 <= values[(adapter, "trigger", "text_similarity", "clip")] <= 1.0
    assert 0.0 <= values[(adapter, "style", "quality", "clip")] <= 1.0
