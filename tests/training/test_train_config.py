"""``beyondlora train``: options (TOML and flags), and every bad input failing fast with a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beyondlora.cli import main
from beyondlora.training.data import (
    BucketDataset,
    UnreadableImageWarning,
    make_buckets,
    process_caption,
    scan_dataset,
)
from beyondlora.training.settings import TrainConfig, TrainConfigError


def make_dataset(root: Path, count: int = 4, size: int = 64, repeats: int = 2) -> Path:
    """A kohya folder ``<repeats>_thing`` of random images (some wider) with captions."""
    rng = np.random.default_rng(0)
    sub = root / f"{repeats}_thing"
    sub.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        width = size + 16 * (i % 2)
        Image.fromarray((rng.random((size, width, 3)) * 255).astype("uint8")).save(sub / f"im{i}.png")
        (sub / f"im{i}.txt").write_text("a thing, red, big")
    return root


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    status = main(["train", *argv])
    return status, capsys.readouterr().err


def test_toml_then_flags_and_effective_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = tmp_path / "run.toml"
    toml.write_text('algo = "loha"\nrank = 4\nmax-steps = 7\nsample_prompts = ["a", "b"]\nlearning_rate = 1\n')
    config = TrainConfig.from_sources(str(toml), {"rank": 2, "algo": None})
    assert (config.algo, config.rank, config.max_steps, config.sample_prompts) == ("loha", 2, 7, ["a", "b"])
    assert config.learning_rate == 1.0 and isinstance(config.learning_rate, float)
    reread = tmp_path / "again.toml"
    reread.write_text(config.to_toml())
    assert TrainConfig.from_sources(str(reread), {}) == config


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("rank = 'four'\n", "option rank must be"),
        ("bogus = 1\n", "unknown option(s): bogus"),
        ("rank = [\n", "not valid TOML"),
    ],
)
def test_bad_toml(tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    status, err = run_cli(capsys, str(path))
    assert status == 2 and message in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--algo", "nope"], "--algo must be one of"),
        (["--random-crop"], "--random-crop contradicts --cache-latents"),
        (["--resume"], "--resume needs the --output-dir"),
        (["--algo", "ia3", "--use-dora"], "--use-dora does not apply to --algo ia3"),
        (["--algo", "glora", "--use-dora"], "--use-dora does not apply to --algo glora"),
        (["--conv-rank", "4", "--preset", "attn"], "--conv-rank/--conv-alpha need --preset full"),
        (["--mixed-precision", "fp16"], "fp16 needs a GPU"),
        (["--warmup-steps", "500", "--max-steps", "10"], "exceeds --max-steps"),
        (["--caption-dropout", "1.5"], "--caption-dropout must be in [0, 1)"),
        (["--max-steps", "0"], "--max-steps must be at least 1"),
        (["--min-snr-gamma", "-1"], "--min-snr-gamma must be positive"),
        (["--pretrained-model", "tiny-sd"], "--train-data-dir is required"),
    ],
)
def test_contradictions_fail_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, flags: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    status, err = run_cli(capsys, *flags)
    assert status == 2, err
    assert message in err
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the output folder


def test_bad_data_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--pretrained-model", "tiny-sd", "--output-dir", str(tmp_path / "out")]
    status, err = run_cli(capsys, *common, "--train-data-dir", str(tmp_path / "missing"))
    assert status == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    status, err = run_cli(capsys, *common, "--train-data-dir", str(tmp_path / "empty"))
    assert status == 2 and "no readable captioned images" in err
    data = make_dataset(tmp_path / "data")
    status, err = run_cli(capsys, *common, "--train-data-dir", str(data), "--resume")
    assert status == 2 and "--resume: no checkpoint in" in err
    assert not (tmp_path / "out").exists()
    data = make_dataset(tmp_path / "nocap")
    (data / "2_thing" / "im1.txt").unlink()
    status, err = run_cli(capsys, *common, "--train-data-dir", str(data))
    assert status == 2 and "no .txt caption" in err and "im1.png" in err


def test_unreadable_image_is_skipped_by_name(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    broken = data / "2_thing" / "broken.png"
    broken.write_bytes(b"not a png at all")
    (data / "2_thing" / "broken.txt").write_text("x")
    with pytest.warns(UnreadableImageWarning, match="broken.png"):
        items = scan_dataset(data)
    assert sorted(i.path.name for i in items) == ["im0.png", "im1.png", "im2.png", "im3.png"]
    assert all(item.repeats == 2 for item in items)


def test_wrong_kinds_of_base_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from safetensors.torch import save_file

    data = make_dataset(tmp_path / "data")
    common = ["--train-data-dir", str(data), "--output-dir", str(tmp_path / "out")]
    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(tmp_path / "adapter.safetensors"))
    (tmp_path / "fake.safetensors").write_bytes(b"garbage")
    for path, message in [
        (tmp_path / "nowhere", "does not exist"),
        (tmp_path / "folder", "is not a diffusers pipeline"),
        (tmp_path / "notes.txt", "is not a diffusers folder or a .safetensors checkpoint"),
        (tmp_path / "adapter.safetensors", "is not a Stable Diffusion checkpoint"),
        (tmp_path / "fake.safetensors", "not a readable safetensors file"),
    ]:
        status, err = run_cli(capsys, "--pretrained-model", str(path), *common)
        assert status == 2 and message in err, (path, err)


def test_imagefolder_metadata_and_buckets(tmp_path: Path) -> None:
    data = tmp_path / "imgs"
    data.mkdir()
    Image.new("RGB", (128, 64)).save(data / "wide.png")
    Image.new("RGB", (64, 64)).save(data / "square.png")
    lines = [{"file_name": "wide.png", "text": "wide"}, {"file_name": "square.png", "caption": "square"}]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    items = scan_dataset(data)
    assert [(i.caption, i.size) for i in items] == [("wide", (128, 64)), ("square", (64, 64))]
    buckets = make_buckets(64, 8)
    assert all(w % 8 == 0 and h % 8 == 0 and w * h <= 64 * 64 for w, h in buckets)
    dataset = BucketDataset(items, 64, 8, enable_bucket=True)
    wide, square = dataset.bucket_of
    assert square == (64, 64) and wide[0] > wide[1] and abs(wide[0] / wide[1] - 2) < 0.3
    batches = dataset.epoch_batches(seed=0, epoch=0, global_batch=2)
    assert all(len({dataset.bucket_of[i] for i in batch}) == 1 for batch in batches)
    assert dataset.epoch_batches(0, 0, 2) == batches


def test_caption_processing() -> None:
    import torch

    generator = torch.Generator().manual_seed(0)
    shuffled = {process_caption("keep, a, b, c, d", True, 1, 0.0, generator) for _ in range(20)}
    assert all(c.startswith("keep, ") and sorted(c.split(", ")) == ["a", "b", "c", "d", "keep"] for c in shuffled)
    assert len(shuffled) > 1
    dropped = [process_caption("x", False, 0, 0.5, generator) for _ in range(200)]
    assert 60 < dropped.count("") < 140


def test_config_errors_are_value_errors() -> None:
    with pytest.raises(TrainConfigError, match="--rank must be at least 1"):
        TrainConfig(rank=0).validate()
    assert issubclass(TrainConfigError, ValueError)
