"""``beyondlora train`` on the tiny offline SD pipeline: outputs, every algorithm and option, resume bit for
bit, SIGTERM checkpoint-and-exit, NaN stop."""

from __future__ import annotations

import json
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from test_train_config import make_dataset

import beyondlora as bl
from beyondlora.training.data import UnreadableImageWarning
from beyondlora.training.settings import TrainConfig, TrainConfigError
from beyondlora.training.trainer import INTERRUPTED, NonFiniteLossError, Trainer, train


def options(data: Path, out: Path, **changes: Any) -> TrainConfig:
    values: dict[str, Any] = dict(
        pretrained_model="tiny-sd",
        train_data_dir=str(data),
        output_dir=str(out),
        batch_size=2,
        max_steps=4,
        save_every=2,
        random_flip=True,
        shuffle_caption=True,
        caption_dropout=0.2,
        sample_seeds=[0],
        sample_steps=2,
        rank=4,
        preset="attn-mlp",
        learning_rate=3e-3,
    )
    values.update(changes)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run of 4 steps."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert train(options(data, out)) == 0
    return out


def test_outputs_of_a_run(reference: Path) -> None:
    records = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["lr"] == pytest.approx(3e-3) and r["loss"] > 0 for r in records)
    adapter = reference / "adapter.safetensors"
    with safe_open(str(adapter), "pt") as handle:
        keys, metadata = list(handle.keys()), handle.metadata()
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert any(".lokr_w1" in k for k in keys)
    assert json.loads(metadata["beyondlora_training"])["max_steps"] == 4
    for picture in ("before_after.png", "loss_curve.png"):
        with Image.open(reference / picture) as image:
            assert image.width > 100
    rerun = TrainConfig.from_sources(str(reference / "config.toml"), {})
    assert rerun.max_steps == 4 and rerun.output_dir == str(reference)
    # the file loads into a fresh pipeline and changes its UNet's output
    pipe = bl.tiny_sd_pipeline()
    sample, t, states = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 16, 32)
    plain = pipe.unet(sample, t, encoder_hidden_states=states).sample
    bl.load_adapter(pipe, adapter, strict=True)
    adapted = pipe.unet(sample, t, encoder_hidden_states=states).sample
    assert not torch.allclose(plain, adapted)


def test_resume_equals_one_run(data: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "halves"
    assert train(options(data, out, max_steps=2)) == 0
    earlier = torch.load(out / "checkpoints" / "step-000002" / "state.pt", weights_only=False)["seconds"]
    assert earlier > 0
    assert train(options(data, out, resume=True)) == 0
    first, second = load_file(str(reference / "adapter.safetensors")), load_file(str(out / "adapter.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # the clock goes on from the checkpoint: the run's time covers both sessions
    assert records[2]["time"] > earlier and records[3]["time"] >= records[2]["time"]
    assert json.loads((out / "summary.json").read_text())["seconds"] >= records[3]["time"] - 0.1


def test_sigterm_saves_and_resume_finishes_the_same(
    data: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Trainer._loss

    def loss_then_signal(self: Trainer, step: int, *args: Any) -> torch.Tensor:
        if step == 2:  # the third step: the run stops once it is done
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, step, *args)

    out = tmp_path / "stopped"
    monkeypatch.setattr(Trainer, "_loss", loss_then_signal)
    assert train(options(data, out)) == INTERRUPTED
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000002", "step-000003"]
    assert not (out / "adapter.safetensors").exists()
    monkeypatch.setattr(Trainer, "_loss", original)
    assert train(options(data, out, resume=True)) == 0
    first, second = load_file(str(reference / "adapter.safetensors")), load_file(str(out / "adapter.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Trainer._loss

    def poisoned(self: Trainer, step: int, *args: Any) -> torch.Tensor:
        loss = original(self, step, *args)
        return loss * float("nan") if step == 2 else loss

    monkeypatch.setattr(Trainer, "_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match="at step 3.*step-000002"):
        train(options(data, out))
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    saved = load_file(str(out / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_existing_run_needs_resume(reference: Path, data: Path) -> None:
    before = (reference / "config.toml").read_text()
    with pytest.raises(ValueError, match="already has checkpoints: pass --resume"):
        train(options(data, reference, max_steps=9))
    assert (reference / "config.toml").read_text() == before  # the run's record is left alone


@pytest.mark.parametrize(
    "changes",
    [
        dict(algo="loha", prediction_type="v_prediction", min_snr_gamma=5.0),
        dict(algo="lora", preset="full", conv_rank=2, conv_alpha=1.0, use_dora=True, noise_offset=0.1),
        dict(algo="ia3", gradient_accumulation=2, lr_scheduler="cosine", warmup_steps=1),
        dict(algo="dylora", train_text_encoder=True, gradient_checkpointing=True, lr_scheduler="linear"),
        dict(algo="full", preset="attn", cache_latents=False, random_crop=True, enable_bucket=False),
        dict(algo="lokr", factor=4, cache_latents_to_disk=True, sample_every=2, sample_prompts=["a thing"]),
        dict(algo="glora", preset="full", conv_rank=2, conv_alpha=1.0, train_text_encoder=True),
        dict(algo="oft", constraint=0.01, rescaled=True),
        dict(algo="boft", preset="full", rank=4, conv_rank=2),
    ],
    ids=[
        "loha-v-minsnr",
        "locon-dora-conv",
        "ia3-accum-cosine",
        "dylora-te-ckpt",
        "full-nocache",
        "lokr-disk",
        "glora",
        "oft-constraint-rescaled",
        "boft-conv-rank",
    ],
)
def test_algorithms_and_options(data: Path, tmp_path: Path, changes: dict[str, Any]) -> None:
    out = tmp_path / "run"
    assert train(options(data, out, max_steps=2, save_every=0, **changes)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    tensors = load_file(str(out / "adapter.safetensors"))
    assert tensors
    if changes.get("train_text_encoder"):
        assert any(k.startswith("lora_te_text_model_") for k in tensors)
    if changes.get("sample_every"):
        assert (out / "samples" / "step-000002.png").is_file()
    if changes.get("cache_latents_to_disk"):
        assert (out / "latent_cache.safetensors").is_file()
    if changes.get("algo") in ("oft", "boft"):
        assert any(k.endswith(".oft_blocks") for k in tensors)
        assert any(k.endswith(".rescale") for k in tensors) == bool(changes.get("rescaled"))
    if changes.get("warmup_steps"):
        assert records[0]["lr"] == pytest.approx(3e-3 / 2)


def test_a_diffusers_folder_as_the_base(data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pipeline"
    bl.tiny_sd_pipeline(seed=3).save_pretrained(str(folder))
    out = tmp_path / "run"
    assert train(options(data, out, pretrained_model=str(folder), max_steps=1, save_every=0)) == 0
    reference = bl.tiny_sd_pipeline(seed=3)
    bl.load_adapter(reference, out / "adapter.safetensors", strict=True)  # every name matches
    assert len(load_file(str(out / "adapter.safetensors"))) > 0


def test_sdxl_with_its_text_encoders(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "xl"
    config = options(data, out, pretrained_model="tiny-sdxl", max_steps=2, save_every=0, train_text_encoder=True)
    assert train(config) == 0
    tensors = load_file(str(out / "adapter.safetensors"))
    prefixes = {key.split("_")[1] for key in tensors}
    assert prefixes == {"unet", "te1", "te2"}
    pipe = bl.tiny_sdxl_pipeline()
    bl.load_adapter(pipe, out / "adapter.safetensors", strict=True)  # SGM UNet names and both encoders match


def test_text_encoder_training_needs_a_preset_that_targets_it(data: Path, tmp_path: Path) -> None:
    with pytest.raises(TrainConfigError, match="unet-only adapts no layer of text encoder 1"):
        train(options(data, tmp_path / "run", preset="unet-only", train_text_encoder=True))


def test_summary_lists_every_file_written(reference: Path) -> None:
    summary = json.loads((reference / "summary.json").read_text())
    on_disk = {p.name + ("/" if p.is_dir() else "") for p in reference.iterdir() if not p.name.startswith(".")}
    assert set(summary["files"]) == on_disk
    assert {"adapter.safetensors", "summary.json", "config.json", "config.toml", "checkpoints/"} <= on_disk


def test_a_rank_that_has_no_effect_is_named(data: Path, tmp_path: Path, capsys) -> None:
    assert train(options(data, tmp_path / "run", algo="lokr", rank=64, max_steps=1, save_every=0)) == 0
    printed = capsys.readouterr().out
    assert "note: rank 64 has no effect on LoKr layers whose W2 is kept full" in printed
    assert train(options(data, tmp_path / "low", algo="lokr", rank=1, factor=4, max_steps=1, save_every=0)) == 0
    assert "has no effect" not in capsys.readouterr().out


def test_a_default_rank_without_effect_is_not_the_users_note(data: Path, tmp_path: Path, capsys) -> None:
    """The rank note speaks of a choice the run made: a default that cannot act on a small model is not
    reported; the same rank named in the sources is."""
    values = options(data, tmp_path, algo="lokr", max_steps=1, save_every=0).to_dict()
    del values["rank"]
    values["output_dir"] = str(tmp_path / "default")
    config = TrainConfig.from_sources(None, values)
    assert config.rank == 8 and not config.was_set("rank")
    assert train(config) == 0
    assert "has no effect" not in capsys.readouterr().out
    values["output_dir"] = str(tmp_path / "named")
    config = TrainConfig.from_sources(None, {**values, "rank": 8})
    assert config.was_set("rank")
    assert train(config) == 0
    assert "note: rank 8 has no effect on LoKr layers whose W2 is kept full" in capsys.readouterr().out


def test_save_as_difference_writes_what_the_uis_apply(data: Path, tmp_path: Path) -> None:
    """(IA)³, which ComfyUI does not load, is written as its exact change: ``diff`` keys only, no warning."""
    config = options(data, tmp_path / "run", algo="ia3", preset="ia3", max_steps=1, save_every=0)
    with pytest.warns(UserWarning, match="ComfyUI has no"):
        assert train(config) == 0
    config = options(data, tmp_path / "diff", algo="ia3", preset="ia3", max_steps=1, save_every=0)
    config.save_as_difference = True
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert train(config) == 0
    keys = load_file(tmp_path / "diff" / "adapter.safetensors")
    assert keys and {key.split(".")[-1] for key in keys} <= {"diff", "diff_b"}


def test_a_half_precision_base_trains_float32_adapters(data: Path, tmp_path: Path) -> None:
    """--base-precision bf16 stores the frozen UNet and text encoder in bf16; the adapter trains in float32."""
    with pytest.raises(TrainConfigError, match="add --mixed-precision bf16"):
        Trainer(options(data, tmp_path / "refused", base_precision="bf16"))
    config = options(data, tmp_path / "run", base_precision="bf16", mixed_precision="bf16", max_steps=2, save_every=0)
    trainer = Trainer(config)
    try:
        assert trainer.run() == 0
    finally:
        trainer.dist.close()  # the accelerate state is process-wide: the next run sets its own precision
    unet = trainer.base.unet
    frozen = {p.dtype for n, p in unet.named_parameters() if not p.requires_grad}
    trained = {p.dtype for p in trainer.trainable.values()}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert {t.dtype for t in load_file(tmp_path / "run" / "adapter.safetensors").values()} == {torch.float32}


def test_an_fp8_base_stores_one_byte_per_weight_and_computes_in_bf16(data: Path, tmp_path: Path) -> None:
    config = options(data, tmp_path / "run", base_precision="fp8", mixed_precision="bf16", max_steps=2, save_every=0)
    trainer = Trainer(config)
    try:
        assert trainer.run() == 0
    finally:
        trainer.dist.close()
    stored = {n: p.dtype for n, p in trainer.base.unet.named_parameters() if not p.requires_grad}
    linear_weights = [n for n in stored if n.endswith("parametrizations.weight.original")]
    assert linear_weights and all(stored[n] == torch.float8_e4m3fn for n in linear_weights)
    assert {d for n, d in stored.items() if n not in linear_weights} == {torch.bfloat16}
    assert {p.dtype for p in trainer.trainable.values()} == {torch.float32}


def test_an_unreadable_image_is_reported_once(tmp_path: Path, capsys) -> None:
    data = make_dataset(tmp_path / "data")
    (data / "2_thing" / "broken.png").write_bytes(b"not a png at all")
    (data / "2_thing" / "broken.txt").write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnreadableImageWarning)  # no Python warning escapes
        assert train(options(data, tmp_path / "run", max_steps=1, save_every=0)) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipping unreadable image") == 1 and "broken.png" in printed
