"""``beyondlora train --preset`` uses kohya / LyCORIS' preset table: the layers each preset adapts, checked
against a walk of the model written here, and the presets the trainer must refuse."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch import nn

import beyondlora as bl
from beyondlora.training.network import adapter_config
from beyondlora.training.settings import TrainConfig, TrainConfigError

BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
OUTSIDE_BLOCKS = {"conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"}


@pytest.fixture(scope="module")
def pipe():
    return bl.tiny_sd_pipeline()


def _layers_inside(model: nn.Module, classes: tuple[str, ...], convs: bool) -> set[str]:
    """Every Linear (and, with ``convs``, Conv2d) inside a module whose class is one of ``classes``."""
    kinds = (nn.Linear, nn.Conv2d) if convs else (nn.Linear,)
    found = set()
    for scope_name, scope in model.named_modules():
        if type(scope).__name__ in classes:
            for name, module in scope.named_modules():
                pointwise = isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
                if isinstance(module, kinds) or pointwise:
                    found.add(f"{scope_name}.{name}")
    return found


def test_full_adapts_kohyas_blocks_and_the_layers_outside_them(pipe) -> None:
    config = adapter_config(TrainConfig(preset="full", algo="lora", rank=4), "unet", pipe.unet)
    assert set(config.target_modules) == _layers_inside(pipe.unet, BLOCKS, convs=True) | OUTSIDE_BLOCKS


def test_attention_presets(pipe) -> None:
    attention = {n for n, _ in pipe.unet.named_modules() if re.search(r"attn\d\.(to_q|to_k|to_v|to_out\.0)$", n)}
    for preset in ("attn-only", "attn"):
        config = adapter_config(TrainConfig(preset=preset), "unet", pipe.unet)
        assert set(config.target_modules) == attention
    mlp = adapter_config(TrainConfig(preset="attn-mlp"), "unet", pipe.unet)
    assert set(mlp.target_modules) == _layers_inside(pipe.unet, ("Transformer2DModel",), convs=False)


def test_unet_only_leaves_the_text_encoder_alone(pipe) -> None:
    config = TrainConfig(preset="unet-only", train_text_encoder=True)
    config.validate()
    assert adapter_config(config, "text_encoder", pipe.text_encoder) is None
    assert adapter_config(config, "unet", pipe.unet) is not None
    text = adapter_config(TrainConfig(preset="full"), "text_encoder", pipe.text_encoder)
    expected = {n for n, m in pipe.text_encoder.named_modules() if re.search(r"(q|k|v|out)_proj$|fc[12]$", n)}
    assert set(text.target_modules) == expected


def test_conv_rank_applies_to_kxk_convs_only(pipe) -> None:
    config = adapter_config(TrainConfig(preset="full", algo="lokr", rank=4, conv_rank=2), "unet", pipe.unet)
    for name in config.target_modules:
        module = pipe.unet.get_submodule(name)
        kxk = isinstance(module, nn.Conv2d) and module.kernel_size != (1, 1)
        options = config.options_for(name)
        assert (options.r, options.alpha) == ((2, 2.0) if kxk else (4, 4.0)), name


def test_ia3_scales_the_mlp_inputs(pipe) -> None:
    config = adapter_config(TrainConfig(preset="ia3", algo="ia3"), "unet", pipe.unet)
    inputs = {n for n in config.target_modules if config.options_for(n).on_input}
    assert inputs and all(n.endswith("ff.net.2") for n in inputs)


def test_presets_the_trainer_refuses(pipe, tmp_path: Path) -> None:
    with pytest.raises(TrainConfigError, match="neither a preset"):
        TrainConfig(preset="no-such-preset").validate()
    with pytest.raises(TrainConfigError, match="--conv-rank/--conv-alpha need --preset full"):
        TrainConfig(preset="attn-only", conv_rank=4).validate()
    mixed = tmp_path / "mixed.toml"
    mixed.write_text(
        'unet_target_module = ["Transformer2DModel"]\n[module_algo_map.Transformer2DModel]\nalgo = "loha"\n'
    )
    with pytest.raises(TrainConfigError, match="other network args"):
        adapter_config(TrainConfig(preset=str(mixed)), "unet", pipe.unet)
