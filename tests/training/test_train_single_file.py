"""A single-file (original LDM / SGM layout) Stable Diffusion checkpoint as ``--pretrained-model``, offline.

The tiny pipelines are written as original-layout checkpoints by an independent converter
(:mod:`helpers.ldm_checkpoint`) and their configs and tokenizers, without weights, as a diffusers folder
(``--base-config``); the loaded UNet, VAE and text encoders must equal the originals exactly, which checks the
converter and the loading at once.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train_config import make_dataset

from beyondlora.demos.tiny_pipelines import tiny_sd_pipeline, tiny_sdxl_pipeline
from beyondlora.training.models import load_base_model
from beyondlora.training.settings import TrainConfig, TrainConfigError
from beyondlora.training.trainer import train
from helpers.ldm_checkpoint import SDXL_OPEN_CLIP_PREFIX, SDXL_TEXT_PREFIX, save_ldm_checkpoint
from helpers.sd_helpers import part_outputs

CPU = torch.device("cpu")


def _scramble(module: torch.nn.Module, seed: int) -> None:
    """Seeded random values of a sensible scale for every parameter (no zero biases hiding a mix-up)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("bias"):
                param.copy_(0.02 * noise)
            elif param.dim() == 1:
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(noise / param[0].numel() ** 0.5)


def tiny_sdxl_distinct_widths(seed: int = 0) -> Any:
    """The tiny SDXL pipeline with a wider second text encoder.

    diffusers tells SDXL's two CLIP text encoders in a single file apart by width (768 and 1280): with the tiny
    pipeline's equal widths it would load the first encoder's weights into the second.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    pipe = tiny_sdxl_pipeline(seed)
    width = 48
    text_config = {**pipe.text_encoder_2.config.to_dict(), "hidden_size": width, "intermediate_size": 2 * width}
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config)).eval()
    unet_config = {**pipe.unet.config, "cross_attention_dim": pipe.text_encoder.config.hidden_size + width}
    unet = UNet2DConditionModel.from_config(unet_config).eval()
    _scramble(text_encoder_2, seed + 1)
    _scramble(unet, seed + 2)
    components = {**pipe.components, "text_encoder_2": text_encoder_2, "unet": unet}
    new = StableDiffusionXLPipeline(**components, add_watermarker=False)
    new.set_progress_bar_config(disable=True)
    return new


def write_base(pipe: Any, root: Path) -> tuple[Path, Path]:
    """``pipe`` as an original-layout ``model.safetensors`` and a weightless diffusers folder ``config``."""
    root.mkdir(parents=True, exist_ok=True)
    checkpoint = save_ldm_checkpoint(pipe, root / "model.safetensors")
    folder = root / "config"
    pipe.save_pretrained(folder)
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()  # only configs and tokenizers: the weights must come from the single file
    return checkpoint, folder


def all_outputs(pipe: Any, kind: str) -> dict[str, torch.Tensor]:
    """Text encoder(s) and UNet outputs for fixed inputs (:func:`part_outputs`), the VAE's latents and decoding."""
    out = part_outputs(pipe, kind)
    pixels = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean
        out["vae_encode"] = latents
        out["vae_decode"] = pipe.vae.decode(latents).sample
    return out


def assert_same_model(loaded: Any, original: Any, kind: str) -> None:
    """Equal weights, bit for bit, and equal outputs (to the last bits: weights read from a file through a memory
    map need not be aligned as freshly allocated ones are, and CPU kernels may then sum in another order)."""
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
    for part in parts:
        expected, actual = getattr(original, part).state_dict(), getattr(loaded, part).state_dict()
        assert actual.keys() == expected.keys(), part
        for key in expected:
            assert torch.equal(actual[key], expected[key]), f"{part}.{key}"
    expected, actual = all_outputs(original, kind), all_outputs(loaded, kind)
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}")


@pytest.fixture(scope="module")
def sd(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    pipe = tiny_sd_pipeline()
    return (pipe, *write_base(pipe, tmp_path_factory.mktemp("sd")))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path, Path]:
    pipe = tiny_sdxl_distinct_widths()
    return (pipe, *write_base(pipe, tmp_path_factory.mktemp("sdxl")))


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, offline Hugging Face cache.  huggingface_hub reads its environment once, at import: the
    module's constants are patched as well as the variables."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_sd_checkpoint_with_base_config_equals_the_pipeline(sd: tuple[Any, Path, Path]) -> None:
    pipe, checkpoint, folder = sd
    keys = load_file(str(checkpoint)).keys()
    assert any(k.startswith("model.diffusion_model.output_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.mid.attn_1.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.") for k in keys)
    base = load_base_model(str(checkpoint), CPU, base_config=str(folder))
    assert not base.is_xl and (base.resolution, base.scale_factor) == (64, 8)
    assert base.tokenizer("a cat").input_ids == pipe.tokenizer("a cat").input_ids
    assert base.scheduler.config.beta_schedule == "scaled_linear"
    assert not any(p.requires_grad for p in base.unet.parameters())
    assert_same_model(base.pipe, pipe, "sd")


def test_sdxl_checkpoint_with_base_config_equals_the_pipeline(sdxl: tuple[Any, Path, Path]) -> None:
    pipe, checkpoint, folder = sdxl
    keys = load_file(str(checkpoint)).keys()
    assert any(k.startswith(SDXL_TEXT_PREFIX + "text_model.") for k in keys)
    assert SDXL_OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight" in keys
    base = load_base_model(str(checkpoint), CPU, base_config=str(folder))
    assert base.is_xl and len(base.tokenizers) == 2
    assert_same_model(base.pipe, pipe, "sdxl")


def test_configs_from_the_local_hub_cache(sd: tuple[Any, Path, Path], empty_hub_cache: Path) -> None:
    """Without --base-config: the configs of the model diffusers infers (SD 1.5 here), found in the cache."""
    pipe, checkpoint, folder = sd
    revision = "0" * 40
    repo = empty_hub_cache / "models--stable-diffusion-v1-5--stable-diffusion-v1-5"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    base = load_base_model(str(checkpoint), CPU)
    assert_same_model(base.pipe, pipe, "sd")


def test_no_base_config_and_an_empty_cache_fails_clearly(sd: tuple[Any, Path, Path], empty_hub_cache: Path) -> None:
    with pytest.raises(TrainConfigError, match="--base-config") as caught:
        load_base_model(str(sd[1]), CPU)
    assert "stable-diffusion-v1-5" in str(caught.value) and "cache" in str(caught.value)


def test_bad_base_config_is_refused(sd: tuple[Any, Path, Path], sdxl: tuple[Any, Path, Path], tmp_path: Path) -> None:
    _, checkpoint, folder = sd
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "empty", checkpoint):
        with pytest.raises(TrainConfigError, match="--base-config .* (not a|does not exist)"):
            load_base_model(str(checkpoint), CPU, base_config=str(bad))
    with pytest.raises(TrainConfigError, match="SDXL"):  # SD 1.x configs for an SDXL checkpoint
        load_base_model(str(sdxl[1]), CPU, base_config=str(folder))
    for model in ("tiny-sd", str(folder)):  # a built-in model, a diffusers folder
        with pytest.raises(TrainConfigError, match="single-file"):
            load_base_model(model, CPU, base_config=str(folder))


def test_base_config_of_another_architecture_fails_clearly(sd: tuple[Any, Path, Path], tmp_path: Path) -> None:
    """A diffusers folder of the right kind but other sizes: the loading error names --base-config."""
    _, checkpoint, _ = sd
    tensors = load_file(str(checkpoint))
    bad = tmp_path / "wider.safetensors"
    key = next(k for k in tensors if k.startswith("model.diffusion_model.input_blocks.0.0.weight"))
    tensors[key] = torch.zeros(24, *tensors[key].shape[1:])
    save_file(tensors, str(bad))
    with pytest.raises(TrainConfigError, match="--base-config"):
        load_base_model(str(bad), CPU, base_config=str(sd[2]))


def test_training_on_the_single_file_equals_training_on_the_pipeline(
    sd: tuple[Any, Path, Path], tmp_path: Path
) -> None:
    """``beyondlora train --pretrained-model model.safetensors --base-config folder`` trains as on the same weights
    built in memory (``tiny-sd``): the same losses and adapter, to the last bits (see :func:`assert_same_model`;
    two Adam steps of 3e-3 move each parameter by about 6e-3, half a percent of that is allowed)."""
    _, checkpoint, folder = sd
    data = make_dataset(tmp_path / "data", count=2)
    adapters, losses = [], []
    for name, model, config in (("file", str(checkpoint), str(folder)), ("built", "tiny-sd", None)):
        options = TrainConfig(
            pretrained_model=model,
            base_config=config,
            train_data_dir=str(data),
            output_dir=str(tmp_path / name),
            batch_size=2,
            max_steps=2,
            save_every=0,
            sample_every=0,
            rank=4,
            preset="attn-mlp",
            learning_rate=3e-3,
        )
        assert train(options) == 0
        adapters.append(load_file(str(tmp_path / name / "adapter.safetensors")))
        metrics = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(line)["loss"] for line in metrics])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert adapters[0].keys() == adapters[1].keys() and adapters[0]
    for key in adapters[0]:
        torch.testing.assert_close(
            adapters[0][key], adapters[1][key], rtol=1e-4, atol=3e-5, msg=lambda m, k=key: f"{k}: {m}"
        )
