"""The built-in demo's pieces: the concept data, the concept measure, the fixed latent map, the pre-trained
base (it draws the colours it was taught), and a short default-style run with its summary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from beyondlora.demos.shapes import (
    BASE_COLOURS,
    CONCEPT_COLOUR,
    CONCEPT_PROMPT,
    PixelCodec,
    concept_score,
    draw_shape,
    load_demo_models,
    write_concept_dataset,
)
from beyondlora.training.data import scan_dataset
from beyondlora.training.report import save_image
from beyondlora.training.sampling import encode_prompts, sample_latents
from beyondlora.training.settings import TrainConfig
from beyondlora.training.trainer import train


def _tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)[None]


def test_concept_dataset_is_a_kohya_folder(tmp_path: Path) -> None:
    root = write_concept_dataset(tmp_path / "concept", count=3, repeats=5)
    items = scan_dataset(root)
    assert len(items) == 3 and all(i.repeats == 5 and i.caption == CONCEPT_PROMPT for i in items)
    assert all(i.size == (16, 16) for i in items)


def test_concept_score_separates_the_concept() -> None:
    rng = np.random.default_rng(3)
    crosses = torch.cat([_tensor(draw_shape("cross", CONCEPT_COLOUR, rng)) for _ in range(4)])
    yellow_squares = torch.cat([_tensor(draw_shape("square", CONCEPT_COLOUR, rng)) for _ in range(4)])
    red_crosses = torch.cat([_tensor(draw_shape("cross", BASE_COLOURS["red"], rng)) for _ in range(4)])
    assert concept_score(crosses).min() > 0.8
    assert concept_score(yellow_squares).max() < 0.7
    assert concept_score(red_crosses).max() == 0.0
    assert concept_score(torch.zeros(2, 3, 16, 16)).tolist() == [0.0, 0.0]


def test_pixel_codec_round_trip() -> None:
    images = torch.rand(2, 3, 16, 16)
    latents = PixelCodec().encode(images * 2 - 1)
    assert latents.shape == (2, 4, 16, 16)
    torch.testing.assert_close(PixelCodec().decode(latents), images)


def test_pretrained_base_draws_the_colours_it_was_taught() -> None:
    unet, text_encoder, tokenizer, scheduler = load_demo_models()
    prompts = [f"a {colour} circle" for colour in BASE_COLOURS]
    cond = encode_prompts(text_encoder, tokenizer, prompts)
    uncond = encode_prompts(text_encoder, tokenizer, [""])
    latents = sample_latents(unet, dict(scheduler.config), cond, uncond, (4, 16, 16), [0] * 3, steps=12)
    images = PixelCodec().decode(latents)
    for channel, image in enumerate(images):  # red, green, blue: the asked channel dominates the bright pixels
        bright = image.max(dim=0).values > 0.5
        assert bright.sum() > 10, f"{prompts[channel]}: nearly black"
        means = image[:, bright].mean(dim=1)
        assert means.argmax().item() == channel, (prompts[channel], means)


def test_short_demo_run_reports_the_concept_measure(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    status = train(TrainConfig(output_dir=str(out), max_steps=2, sample_seeds=[0], sample_steps=2, save_every=0))
    assert status == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["score_before"] <= 1.0 and 0.0 <= summary["score_after"] <= 1.0
    printed = capsys.readouterr().out
    assert "concept score of 'a yellow cross'" in printed and f"before {summary['score_before']:.3f}" in printed
    assert len(list((out / "concept_data").rglob("*.png"))) == 8
    assert (out / "adapter.safetensors").is_file() and (out / "before_after.png").is_file()
    # the defaults the model and the algorithm decided are on record: the run reruns as it ran
    recorded = TrainConfig.from_sources(str(out / "config.toml"), {})
    assert (recorded.learning_rate, recorded.batch_size, recorded.resolution) == (4e-3, 8, 16)


def test_own_data_on_the_demo_base_samples_its_own_prompts(tmp_path: Path, capsys) -> None:
    """Training on a folder of one's own captioned images (not the demo concept): the previews and the summary
    use its captions, and no demo concept score is reported."""
    data = tmp_path / "data" / "3_thing"
    data.mkdir(parents=True)
    for number, caption in enumerate(["a green thing", "a purple thing"]):
        image = torch.zeros(3, 16, 16)
        image[number, 4:12, 4:12] = 1.0
        save_image(image, data / f"im{number}.png")
        (data / f"im{number}.txt").write_text(caption)
    out = tmp_path / "run"
    config = TrainConfig(
        train_data_dir=str(tmp_path / "data"), output_dir=str(out), max_steps=2, sample_seeds=[0], sample_steps=2
    )
    assert train(config) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sample_prompts"] == ["a green thing", "a purple thing"]
    assert "score_before" not in summary and "prompt" not in summary
    assert "concept score" not in capsys.readouterr().out
    assert not (out / "concept_data").exists()
