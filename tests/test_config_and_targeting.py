"""Configs (validation, aliases, JSON) and targeting (name forms, patterns, errors)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondlora as bl
from beyondlora.config import AdapterConfig


class Tiny(nn.Module):
    """A two-layer stack with attention-like names, a norm, an unsupported module and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleDict({"query": nn.Linear(8, 8), "value": nn.Linear(8, 8), "norm": nn.LayerNorm(8)})
            for _ in range(2)
        )
        self.pool = nn.AdaptiveAvgPool1d(4)
        self.lm_head = nn.Linear(8, 5)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer["norm"](layer["query"](x) + layer["value"](x))
        return self.lm_head(x)


def adapted_names(model: bl.PeftModel, adapter: str = "default") -> set[str]:
    return {n for n, m in model.base_model.named_modules() if isinstance(m, bl.AdapterLayer) and adapter in m.adapters}


def test_alias_lora_alpha_and_defaults() -> None:
    assert bl.LoKrConfig(r=4, lora_alpha=2, target_modules=["q"]).alpha == 2
    assert bl.LoKrConfig(r=4, target_modules=["q"]).alpha == 4
    assert bl.LoraConfig(r=4, lora_dropout=0.1, init_lora_weights=False, target_modules=["q"]).dropout == 0.1
    with pytest.raises(ValueError, match="disagree"):
        bl.LoKrConfig(r=4, alpha=1, lora_alpha=2)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: bl.LoKrConfig(r=0), "r must be a positive integer"),
        (lambda: bl.LoKrConfig(r=-2), "r must be a positive integer"),
        (lambda: bl.LoKrConfig(decompose_factor=0), "decompose_factor"),
        (lambda: bl.LoKrConfig(decompose_factor=-3), "decompose_factor"),
        (lambda: bl.LoHaConfig(rank_dropout=1.0), "rank_dropout"),
        (lambda: bl.LoHaConfig(module_dropout=-0.1), "module_dropout"),
        (lambda: bl.LoraConfig(init_weights="gaussian"), "init_weights"),
        (lambda: bl.DyLoraConfig(r=6, block_size=4), "block_size"),
        (lambda: bl.LoraConfig(forward_mode="fast"), "forward_mode"),
        (lambda: bl.LoKrConfig(backward_memory="none"), "backward_memory"),
        (lambda: bl.LoraConfig(rank_pattern={"q": 0}), "rank_pattern"),
    ],
)
def test_invalid_options_raise(make, message) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_unknown_field_raises() -> None:
    with pytest.raises(TypeError, match="foo"):
        bl.LoKrConfig(foo=1)
    with pytest.raises(ValueError, match="foo"):
        AdapterConfig.from_dict({"peft_type": "LOKR", "foo": 1})
    with pytest.raises(ValueError, match="peft_type"):
        AdapterConfig.from_dict({"peft_type": "BOGUS"})


@pytest.mark.parametrize(
    "config",
    [
        bl.LoKrConfig(
            r=4, alpha=2, decompose_both=True, decompose_factor=4, target_modules=["query"], rank_pattern={"value": 2}
        ),
        bl.LoHaConfig(r=2, use_effective_conv2d=True, target_modules=r".*query", use_dora=True),
        bl.LoraConfig(r=3, use_rslora=True, dropout=0.1, target_modules="all-linear", modules_to_save=["lm_head"]),
        bl.IA3Config(target_modules=["query", "value"], feedforward_modules=["value"]),
        bl.DyLoraConfig(r=8, block_size=2, target_modules=["query"]),
        bl.FullConfig(target_modules=["query"]),
        bl.NormConfig(),
    ],
)
def test_json_round_trip(config: AdapterConfig, tmp_path) -> None:
    config.save(tmp_path)
    loaded = AdapterConfig.load(tmp_path)
    assert type(loaded) is type(config) and loaded == config


def test_target_forms() -> None:
    suffix = bl.get_peft_model(Tiny(), bl.LoraConfig(target_modules=["query"]))
    assert adapted_names(suffix) == {"layers.0.query", "layers.1.query"}
    regex = bl.get_peft_model(Tiny(), bl.LoraConfig(target_modules=r"layers\.1\.(query|value)"))
    assert adapted_names(regex) == {"layers.1.query", "layers.1.value"}
    every = bl.get_peft_model(Tiny(), bl.LoraConfig(target_modules="all-linear"))
    assert adapted_names(every) == {f"layers.{i}.{n}" for i in range(2) for n in ("query", "value")}  # no lm_head
    excluded = bl.get_peft_model(Tiny(), bl.LoraConfig(target_modules="all-linear", exclude_modules=["layers.0.value"]))
    assert "layers.0.value" not in adapted_names(excluded)
    layered = bl.get_peft_model(
        Tiny(), bl.LoraConfig(target_modules=["query"], layers_to_transform=1, layers_pattern="layers")
    )
    assert adapted_names(layered) == {"layers.1.query"}
    norms = bl.get_peft_model(Tiny(), bl.NormConfig())
    assert adapted_names(norms) == {"layers.0.norm", "layers.1.norm"}


def test_rank_and_alpha_patterns() -> None:
    config = bl.LoHaConfig(
        r=4,
        alpha=4,
        target_modules=["query", "value"],
        rank_pattern={r"layers\.1\.value": 2},
        alpha_pattern={"query": 1},
    )
    model = bl.get_peft_model(Tiny(), config)
    layers = dict(model.base_model.named_modules())
    assert layers["layers.1.value"].adapters["default"].rank == 2
    assert layers["layers.0.value"].adapters["default"].rank == 4
    assert layers["layers.0.query"].adapters["default"].scale == pytest.approx(1 / 4)
    assert layers["layers.1.value"].adapters["default"].scale == pytest.approx(4 / 2)


def test_feedforward_modules_scale_inputs() -> None:
    model = bl.get_peft_model(Tiny(), bl.IA3Config(target_modules=["query", "value"], feedforward_modules=["value"]))
    layers = dict(model.base_model.named_modules())
    assert layers["layers.0.value"].adapters["default"].on_input
    assert not layers["layers.0.query"].adapters["default"].on_input


@pytest.mark.parametrize(
    "config, error, message",
    [
        (bl.LoraConfig(target_modules=["nothing_here"]), ValueError, "matched no module"),
        (bl.LoraConfig(), ValueError, "needs target_modules"),
        (
            bl.LoraConfig(target_modules=["query"], rank_pattern={"missing": 2}),
            ValueError,
            "rank_pattern key 'missing'",
        ),
        (bl.LoraConfig(target_modules=["query"], modules_to_save=["nope"]), ValueError, "modules_to_save entry 'nope'"),
        (bl.LoraConfig(target_modules=["pool"]), TypeError, r"module 'pool' \(AdaptiveAvgPool1d\)"),
        (bl.IA3Config(target_modules=["norm"]), TypeError, r"module 'layers.0.norm' \(LayerNorm\): ia3 cannot adapt"),
        (bl.NormConfig(target_modules=["query"]), TypeError, "norm cannot adapt a linear layer"),
        (bl.LoraConfig(target_modules=["query"], use_dora=True, init_weights=True), None, None),
    ],
)
def test_bad_targets_raise_and_change_nothing(config, error, message) -> None:
    model = Tiny()
    before = repr(model)
    if error is None:
        bl.get_peft_model(model, config)
        return
    with pytest.raises(error, match=message):
        bl.get_peft_model(model, config)
    assert repr(model) == before
    assert all(p.requires_grad for p in model.parameters())
    assert not any(isinstance(m, bl.AdapterLayer) for m in model.modules())


def test_forward_mode_and_backward_memory_reach_every_layer() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Conv1d(8, 8, 3))
    config = bl.LoHaConfig(r=2, target_modules=["0", "2"], forward_mode="bypass", backward_memory="lean")
    peft = bl.get_peft_model(model, config)
    layers = [m for m in peft.modules() if isinstance(m, bl.AdapterLayer)]
    assert len(layers) == 2
    assert all((m.forward_mode, m.backward_memory) == ("bypass", "lean") for m in layers)


def test_ia3_meaning_follows_the_front_end() -> None:
    """PEFT's API means PEFT's (IA)³, the bias of output-scaled layers scaled; the front ends that write LyCORIS
    files (``beyondlora train``, kohya's network, both through ``build_config``) mean LyCORIS'."""
    from beyondlora.algorithms.config_base import build_config
    from beyondlora.integrations.kohya_args import NetworkArgs, adapter_config

    assert bl.IA3Config(target_modules=["fc"]).scale_bias is True
    assert bl.IA3Config.from_dict({"peft_type": "IA3", "target_modules": ["fc"]}).scale_bias is True
    assert build_config("ia3", target_modules=["fc"]).scale_bias is False
    assert build_config("ia3", target_modules=["fc"], scale_bias=True).scale_bias is True
    assert adapter_config(NetworkArgs(algo="ia3"), ["fc"], conv=False, norm=False).scale_bias is False
    options = bl.IA3Config(target_modules=["fc"], scale_bias=False).options_for("fc")
    assert options.scale_bias is False
