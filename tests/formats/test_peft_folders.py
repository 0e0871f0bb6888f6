"""PEFT adapter folders, both ways, against the real ``peft`` package.

(1) ours → PEFT: an adapter made and randomized here, saved with ``save_pretrained``, loaded by
``peft.PeftModel.from_pretrained`` into a fresh identical base, must give our outputs; or the save raises
:class:`FormatError` (pointing at a .safetensors file) and leaves no weights behind.
(2) PEFT → ours: an adapter made by ``peft.get_peft_model``, randomized and saved by PEFT, loaded by
``bl.PeftModel.from_pretrained`` must give PEFT's outputs.

Every model is small, float32, seeded and in eval mode; every adapter is randomized so ΔW ≠ 0.
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
import transformers
from torch import nn

import beyondlora as bl
from beyondlora.errors import FormatError
from beyondlora.host.modules_to_save import ModulesToSaveWrapper

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


# --- models ------------------------------------------------------------------------------------------------
class Net(nn.Module):
    """Linear, 3×3 and 1×1 Conv2d, Conv1d and Embedding; ``fc2`` and ``conv2`` have no bias."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16, bias=False)
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 4, 1, bias=False)
        self.conv1d = nn.Conv1d(4, 6, 3)

    def forward(self, ids: torch.Tensor, img: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(self.emb(ids))))
        c = self.conv2(torch.relu(self.conv1(img)))
        s = self.conv1d(seq)
        return torch.cat([h.flatten(1), c.flatten(1), s.flatten(1)], 1)


class Wide(nn.Module):
    """Layers wide enough for LoKr ``decompose_factor`` 8 and 32, and a 16→32 3×3 conv for Tucker."""

    def __init__(self) -> None:
        super().__init__()
        self.fc_a = nn.Linear(64, 128)
        self.fc_b = nn.Linear(128, 64)
        self.down = nn.Linear(64, 16)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.down(torch.relu(self.fc_b(torch.relu(self.fc_a(x)))))
        return torch.cat([h.flatten(1), self.conv(img).flatten(1)], 1)


class Odd(nn.Module):
    """Layers PEFT cannot express some adapters on (only saved, never run)."""

    def __init__(self) -> None:
        super().__init__()
        self.reflect = nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect")
        self.grouped = nn.Conv2d(4, 8, 3, padding=1, groups=2)
        self.dilated = nn.Conv2d(4, 8, 3, padding=2, dilation=2)
        self.conv3d = nn.Conv3d(2, 4, 3, padding=1)


@torch.no_grad()
def _nonzero_biases(model: nn.Module) -> nn.Module:
    """transformers zero-initializes biases; give them values so bias handling is really exercised."""
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            nn.init.normal_(param, std=0.1)
    return model


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=32)
    return _nonzero_biases(transformers.GPT2LMHeadModel(config))


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
        num_labels=3,
    )
    return _nonzero_biases(transformers.BertForSequenceClassification(config))


def _volume() -> nn.Module:
    """Two Conv3d (PEFT's (IA)³ has them), the first with a bias."""
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 3, 1, bias=False))


def _grouped() -> nn.Module:
    """Grouped convolutions (groups 2), with and without a bias."""
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 6, 1, groups=2, bias=False))


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "net": Net,
    "wide": Wide,
    "odd": Odd,
    "gpt2": _gpt2,
    "bert": _bert,
    "volume": _volume,
    "grouped": _grouped,
}


@functools.cache
def _template(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[kind]().eval()


def make(kind: str) -> nn.Module:
    """A fresh base model, identical for every call with the same kind."""
    return copy.deepcopy(_template(kind)).eval()


def inputs(kind: str) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(123)
    if kind == "net":
        return (
            torch.randint(0, 30, (2, 5), generator=gen),
            torch.randn(2, 4, 6, 6, generator=gen),
            torch.randn(2, 4, 10, generator=gen),
        )
    if kind == "wide":
        return torch.randn(2, 64, generator=gen), torch.randn(2, 16, 5, 5, generator=gen)
    if kind == "volume":
        return (torch.randn(2, 2, 4, 5, 5, generator=gen),)
    if kind == "grouped":
        return (torch.randn(2, 4, 5, 5, generator=gen),)
    return (torch.randint(0, 100, (2, 8), generator=gen),)


@torch.no_grad()
def run(kind: str, model: nn.Module, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if kind in ("gpt2", "bert"):
        return model(input_ids=x[0]).logits
    return model(*x)


# --- randomization -------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_ours(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, bl.AdapterLayer):
            for adapter in module.adapters.values():
                for name, param in adapter.named_parameters():
                    if name == "dora_scale":
                        param.mul_(1 + 0.1 * torch.randn_like(param))
                    else:
                        nn.init.normal_(param, std=0.1)
        elif isinstance(module, ModulesToSaveWrapper):
            for trained in module.modules_to_save.values():
                for param in trained.parameters():
                    param.add_(0.1 * torch.randn_like(param))


@torch.no_grad()
def randomize_peft(model: nn.Module) -> None:
    touched = 0
    for name, param in model.named_parameters():
        if "lora_magnitude_vector" in name:
            param.mul_(1 + 0.1 * torch.randn_like(param))
        elif "ia3_l" in name:
            param.copy_(1 + 0.1 * torch.randn_like(param))
        elif any(key in name for key in ("lora_", "hada_", "lokr_")):
            nn.init.normal_(param, std=0.1)
        elif "modules_to_save" in name:
            param.add_(0.1 * torch.randn_like(param))
        else:
            continue
        touched += 1
    assert touched, "no adapter parameter found to randomize"


def assert_adapted(kind: str, output: torch.Tensor, x: tuple[torch.Tensor, ...]) -> None:
    """The adapter really changes the output (so equal outputs prove something)."""
    assert (output - run(kind, make(kind), x)).abs().max() > 1e-3


def assert_untouched(model: nn.Module, kind: str) -> None:
    template = _template(kind)
    assert [type(m) for m in model.modules()] == [type(m) for m in template.modules()]
    assert all(p.requires_grad for p in model.parameters())
    for (name, value), (_, original) in zip(model.state_dict().items(), template.state_dict().items(), strict=True):
        assert torch.equal(value, original), name


# --- (1) ours → PEFT -------------------------------------------------------------------------------------------
ALL = ["emb", "fc1", "fc2", "conv1", "conv2", "conv1d"]
DENSE = ["fc1", "fc2", "conv1", "conv2", "conv1d"]  # LoHa / LoKr: PEFT has them on no Embedding
NO_CONV1D = ["fc1", "fc2", "conv1", "conv2"]
WIDE_LINEAR = ["fc_a", "fc_b"]

OURS_TO_PEFT = {
    "lora": ("net", bl.LoraConfig(r=4, target_modules=ALL), None),
    "lora-alpha": ("net", bl.LoraConfig(r=4, alpha=12, target_modules=ALL), None),
    "lora-lora_alpha-alias": ("net", bl.LoraConfig(r=4, lora_alpha=2, target_modules=ALL), None),
    "lora-rslora": ("net", bl.LoraConfig(r=4, alpha=6, use_rslora=True, target_modules=ALL), None),
    "lora-multiplier": ("net", bl.LoraConfig(r=4, alpha=8, target_modules=ALL), 0.6),
    "lora-dora": ("net", bl.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=DENSE), None),
    "lora-patterns": (
        "net",
        bl.LoraConfig(
            r=4,
            alpha=8,
            rank_pattern={"fc1": 2, "conv1": 6},
            alpha_pattern={"fc2": 3, "conv1d": 5},
            target_modules=ALL,
        ),
        None,
    ),
    "lora-patterns-rslora-multiplier": (
        "net",
        bl.LoraConfig(
            r=4, alpha=8, use_rslora=True, rank_pattern={"fc1": 2}, alpha_pattern={"conv1": 3}, target_modules=ALL
        ),
        0.6,
    ),
    "lora-embedding": ("net", bl.LoraConfig(r=4, alpha=2, target_modules=["emb"]), None),
    "lora-gpt2-conv1d": ("gpt2", bl.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj"]), None),
    "lora-gpt2-dora": ("gpt2", bl.LoraConfig(r=4, alpha=8, use_dora=True, target_modules=["c_attn", "c_proj"]), None),
    "lora-bert-modules_to_save": (
        "bert",
        bl.LoraConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
        None,
    ),
    "dylora": ("net", bl.DyLoraConfig(r=4, alpha=8, block_size=2, target_modules=ALL), None),
    "dylora-multiplier": ("net", bl.DyLoraConfig(r=4, alpha=3, block_size=1, target_modules=ALL), 0.6),
    "loha": ("net", bl.LoHaConfig(r=4, target_modules=DENSE), None),
    "loha-alpha": ("net", bl.LoHaConfig(r=4, alpha=2, target_modules=DENSE), None),
    "loha-tucker-conv2d": (
        "net",
        bl.LoHaConfig(r=3, alpha=300, use_effective_conv2d=True, target_modules=["conv1"]),
        None,
    ),
    "loha-multiplier": ("net", bl.LoHaConfig(r=4, alpha=8, target_modules=DENSE), 0.6),
    "lokr": ("net", bl.LoKrConfig(r=2, alpha=3, target_modules=NO_CONV1D), None),
    "lokr-conv1d-decomposed-w2": ("net", bl.LoKrConfig(r=1, alpha=2, target_modules=["conv1d"]), None),
    "lokr-factor2": ("net", bl.LoKrConfig(r=2, alpha=3, decompose_factor=2, target_modules=NO_CONV1D), None),
    "lokr-factor4": ("net", bl.LoKrConfig(r=2, alpha=3, decompose_factor=4, target_modules=["fc1", "fc2"]), None),
    "lokr-factor8": ("wide", bl.LoKrConfig(r=2, alpha=3, decompose_factor=8, target_modules=WIDE_LINEAR), None),
    "lokr-decompose_both": (
        "wide",
        bl.LoKrConfig(r=2, alpha=5, decompose_both=True, target_modules=[*WIDE_LINEAR, "conv"]),
        None,
    ),
    "lokr-full-w2-alpha": ("net", bl.LoKrConfig(r=8, alpha=3, target_modules=NO_CONV1D), None),
    "lokr-tucker-conv2d": (
        "wide",
        bl.LoKrConfig(r=2, alpha=3, use_effective_conv2d=True, target_modules=["conv"]),
        None,
    ),
    "lokr-unbalanced": (
        "wide",
        bl.LoKrConfig(r=2, alpha=3, decompose_factor=8, unbalanced_factorization=True, target_modules=["down"]),
        None,
    ),
    "lokr-multiplier": ("net", bl.LoKrConfig(r=2, alpha=3, target_modules=NO_CONV1D), 0.6),
    "ia3-output-bias-free": ("net", bl.IA3Config(target_modules=["fc2", "conv2"]), None),
    "ia3-feedforward": (
        "net",
        bl.IA3Config(target_modules=["fc1", "fc2", "conv1", "conv2"], feedforward_modules=["fc1", "conv1"]),
        None,
    ),
    "ia3-multiplier": (
        "net",
        bl.IA3Config(target_modules=["fc1", "fc2", "conv2"], feedforward_modules=["fc1"]),
        0.6,
    ),
    "ia3-gpt2-feedforward": ("gpt2", bl.IA3Config(target_modules=["c_proj"], feedforward_modules=["c_proj"]), None),
    # PEFT's (IA)³ scales the bias of an output-scaled layer, (W x + b) ⊙ l: so does IA3Config by default
    "ia3-output-biased-linear": ("net", bl.IA3Config(target_modules=["fc1"]), None),
    "ia3-output-biased-conv": ("net", bl.IA3Config(target_modules=["conv1"]), None),
    "ia3-output-biased-multiplier": ("net", bl.IA3Config(target_modules=["fc1", "conv1", "fc2"]), 0.6),
    "ia3-gpt2-output-biased": (
        "gpt2",
        bl.IA3Config(target_modules=["c_attn", "c_proj"], feedforward_modules=["c_proj"]),
        None,
    ),
    "ia3-conv3d": ("volume", bl.IA3Config(target_modules=["0", "2"]), None),
    "ia3-conv3d-feedforward": ("volume", bl.IA3Config(target_modules=["0", "2"], feedforward_modules=["0"]), None),
    "ia3-grouped-conv": ("grouped", bl.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"]), None),
    "ia3-grouped-conv-feedforward": ("grouped", bl.IA3Config(target_modules=["0"], feedforward_modules=["0"]), None),
}


def _ours(kind: str, config: bl.AdapterConfig, multiplier: float | None = None, **kwargs) -> bl.PeftModel:
    torch.manual_seed(1)
    model = bl.get_peft_model(make(kind), copy.deepcopy(config), **kwargs).eval()
    randomize_ours(model)
    if multiplier is not None:
        model.set_multiplier(multiplier)
    return model


@pytest.mark.parametrize("case", list(OURS_TO_PEFT))
def test_ours_to_peft(case: str, tmp_path: Path) -> None:
    kind, config, multiplier = OURS_TO_PEFT[case]
    ours = _ours(kind, config, multiplier)
    x = inputs(kind)
    expected = run(kind, ours, x)
    assert_adapted(kind, expected, x)
    ours.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS).is_file()
    theirs = peft.PeftModel.from_pretrained(make(kind), tmp_path).eval()
    assert_same(run(kind, theirs, x), expected)


def test_ours_to_peft_non_default_adapters(tmp_path: Path) -> None:
    """``default`` in the folder, ``second`` in its subfolder; PEFT loads each and matches it."""
    ours = bl.get_peft_model(make("net"), bl.LoraConfig(r=4, alpha=8, target_modules=["fc1", "conv1"])).eval()
    ours.add_adapter("second", bl.LoraConfig(r=2, alpha=3, use_dora=True, target_modules=["fc2", "conv1d", "conv1"]))
    randomize_ours(ours)
    x = inputs("net")
    first = run("net", ours, x)
    ours.set_adapter("second")
    second = run("net", ours, x)
    ours.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS).is_file() and (tmp_path / "second" / WEIGHTS).is_file()

    theirs = peft.PeftModel.from_pretrained(make("net"), tmp_path).eval()
    theirs.load_adapter(tmp_path / "second", adapter_name="second")
    theirs.eval()
    assert_same(run("net", theirs, x), first)
    theirs.set_adapter("second")
    assert_same(run("net", theirs, x), second)
    # the second adapter alone, straight from its subfolder
    alone = peft.PeftModel.from_pretrained(make("net"), tmp_path / "second", adapter_name="second").eval()
    assert_same(run("net", alone, x), second)


def test_ours_to_peft_only_adapter_named_other(tmp_path: Path) -> None:
    config = bl.LoHaConfig(r=3, alpha=300, use_effective_conv2d=True, target_modules=NO_CONV1D)
    ours = _ours("net", config, adapter_name="other")
    x = inputs("net")
    expected = run("net", ours, x)
    ours.save_pretrained(tmp_path)
    assert not (tmp_path / WEIGHTS).exists() and (tmp_path / "other" / WEIGHTS).is_file()
    theirs = peft.PeftModel.from_pretrained(make("net"), tmp_path / "other", adapter_name="other").eval()
    assert_same(run("net", theirs, x), expected)


# --- refusals (ours → PEFT) --------------------------------------------------------------------------------
REFUSALS = {
    "padding_mode-reflect": ("odd", bl.LoraConfig(r=2, target_modules=["reflect"]), None),
    "loha-padding_mode-reflect": ("odd", bl.LoHaConfig(r=2, target_modules=["reflect"]), None),
    "lora-grouped-conv": ("odd", bl.LoraConfig(r=2, target_modules=["grouped"]), None),
    "lora-dilated-conv": ("odd", bl.LoraConfig(r=2, target_modules=["dilated"]), None),
    "lora-tucker": ("net", bl.LoraConfig(r=2, use_effective_conv2d=True, target_modules=["conv1"]), None),
    "loha-embedding": ("net", bl.LoHaConfig(r=2, target_modules=["emb"]), None),
    "lokr-embedding": ("net", bl.LoKrConfig(r=2, target_modules=["emb"]), None),
    "loha-hf-conv1d": ("gpt2", bl.LoHaConfig(r=2, target_modules=["c_attn"]), None),
    "lokr-hf-conv1d": ("gpt2", bl.LoKrConfig(r=2, target_modules=["c_proj"]), None),
    "loha-conv3d": ("odd", bl.LoHaConfig(r=2, target_modules=["conv3d"]), None),
    "lokr-conv3d": ("odd", bl.LoKrConfig(r=2, target_modules=["conv3d"]), None),
    "loha-tucker-conv1d": ("net", bl.LoHaConfig(r=2, use_effective_conv2d=True, target_modules=["conv1d"]), None),
    "lokr-tucker-conv1d": ("net", bl.LoKrConfig(r=1, use_effective_conv2d=True, target_modules=["conv1d"]), None),
    "loha-dora": ("net", bl.LoHaConfig(r=2, use_dora=True, target_modules=["fc1"]), None),
    "lokr-dora": ("net", bl.LoKrConfig(r=2, use_dora=True, target_modules=["fc1"]), None),
    "dora-multiplier": ("net", bl.LoraConfig(r=2, use_dora=True, target_modules=["fc1"]), 0.6),
    "dora-input-axis": ("net", bl.LoraConfig(r=2, use_dora=True, dora_on_output=False, target_modules=["fc1"]), None),
    "lokr-conv1d-full-w2": ("net", bl.LoKrConfig(r=4, target_modules=["conv1d"]), None),
    # LyCORIS' meaning, W x ⊙ (1 + v) + b: PEFT's (IA)³ would scale the bias too
    "ia3-lycoris-output-biased-linear": ("net", bl.IA3Config(target_modules=["fc1"], scale_bias=False), None),
    "ia3-lycoris-output-biased-conv": ("net", bl.IA3Config(target_modules=["conv1"], scale_bias=False), None),
    "ia3-lycoris-gpt2-output-biased": (
        "gpt2",
        bl.IA3Config(target_modules=["c_attn", "c_proj"], feedforward_modules=["c_proj"], scale_bias=False),
        None,
    ),
    "lokr-no-peft-factor": ("net", bl.LoKrConfig(r=2, decompose_factor=8, target_modules=["fc1"]), None),
    # factor 4 splits 4 channels 1×4 (LyCORIS), which PEFT gives for no factor together with 8 → 2×4
    "lokr-factor4-conv-no-peft-factor": ("net", bl.LoKrConfig(r=2, decompose_factor=4, target_modules=["conv1"]), None),
    "lokr-unbalanced-no-peft-factor": (
        "net",
        bl.LoKrConfig(r=2, unbalanced_factorization=True, target_modules=["fc1"]),
        None,
    ),
}


def assert_refused(model: bl.PeftModel, directory: Path) -> None:
    with pytest.raises(FormatError, match=r"save to a \.safetensors file"):
        model.save_pretrained(directory)
    assert not list(directory.rglob(WEIGHTS))
    assert not list(directory.rglob(CONFIG))


@pytest.mark.parametrize("case", list(REFUSALS))
def test_ours_to_peft_refusals(case: str, tmp_path: Path) -> None:
    kind, config, multiplier = REFUSALS[case]
    assert_refused(_ours(kind, config, multiplier), tmp_path)


def test_ia3_output_on_biased_layer_allowed_while_zero(tmp_path: Path) -> None:
    """The refusal of LyCORIS' meaning is only for a non-zero vector: an untrained one saves and matches."""
    config = bl.IA3Config(target_modules=["fc1", "conv1"], scale_bias=False)
    ours = bl.get_peft_model(make("net"), config).eval()
    x = inputs("net")
    expected = run("net", ours, x)
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make("net"), tmp_path).eval()
    assert_same(run("net", theirs, x), expected)


def test_ia3_on_torch_conv1d_refused(tmp_path: Path) -> None:
    """PEFT's (IA)³ has no nn.Conv1d layer, so no folder we write can hold one: the save must refuse."""
    with pytest.raises(ValueError, match="is not supported"):
        peft.get_peft_model(make("net"), peft.IA3Config(target_modules=["conv1d"], feedforward_modules=[]))
    assert_refused(_ours("net", bl.IA3Config(target_modules=["conv1d"])), tmp_path)


IA3_MERGES = {
    "net": (["fc1", "fc2", "conv1", "conv2"], ["fc2"]),
    "gpt2": (["c_attn", "c_proj", "c_fc"], ["c_proj"]),
    "volume": (["0", "2"], ["2"]),
    "grouped": (["0", "2"], ["2"]),
}


@pytest.mark.parametrize("kind", list(IA3_MERGES))
def test_ia3_merged_weights_match_peft(kind: str, tmp_path: Path) -> None:
    """(IA)³ folders both ways, on layers with biases: PEFT's ``merge_and_unload`` gives the weights and biases
    ours gives (output-scaled layers scale their bias, feedforward layers leave it)."""
    targets, feedforward = IA3_MERGES[kind]
    fan_in_fan_out = kind == "gpt2"
    ours = _ours(kind, bl.IA3Config(target_modules=targets, feedforward_modules=feedforward))
    theirs = _peft(
        kind, peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, fan_in_fan_out=fan_in_fan_out)
    )
    ours.save_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    pairs = [
        (ours.merge_and_unload(), peft.PeftModel.from_pretrained(make(kind), tmp_path / "ours").merge_and_unload()),
        (bl.PeftModel.from_pretrained(make(kind), tmp_path / "theirs").merge_and_unload(), theirs.merge_and_unload()),
    ]
    base = make(kind).state_dict()
    for ours_merged, peft_merged in pairs:
        expected = peft_merged.state_dict()
        assert any(k.endswith("bias") and not torch.equal(v, base[k]) for k, v in expected.items())
        for key, value in ours_merged.state_dict().items():
            assert_same(value, expected[key])


# --- (2) PEFT → ours ----------------------------------------------------------------------------------------------
PEFT_TO_OURS = {
    "lora": ("net", lambda: peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=ALL)),
    "lora-rslora-patterns": (
        "net",
        lambda: peft.LoraConfig(
            r=4,
            lora_alpha=6,
            use_rslora=True,
            rank_pattern={"fc1": 2, "conv1": 6},
            alpha_pattern={"fc2": 3, "conv1d": 5},
            target_modules=ALL,
        ),
    ),
    "lora-dora": ("net", lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=DENSE)),
    "lora-gpt2-conv1d": (
        "gpt2",
        lambda: peft.LoraConfig(r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj"]),
    ),
    "lora-gpt2-dora": (
        "gpt2",
        lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, fan_in_fan_out=True, target_modules=["c_attn"]),
    ),
    "lora-bert-modules_to_save": (
        "bert",
        lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
    ),
    # task type SEQ_CLS: PEFT itself adds modules_to_save ["classifier", "score"] (no "score" in BERT)
    "lora-bert-seq-cls": (
        "bert",
        lambda: peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]),
    ),
    "loha": ("net", lambda: peft.LoHaConfig(r=4, alpha=6, target_modules=DENSE)),
    "loha-effective-conv2d": (
        "net",
        lambda: peft.LoHaConfig(r=3, alpha=300, use_effective_conv2d=True, target_modules=NO_CONV1D),
    ),
    "loha-effective-conv2d-on-conv1d": (
        "net",
        lambda: peft.LoHaConfig(r=3, alpha=300, use_effective_conv2d=True, target_modules=["conv1d"]),
    ),
    "lokr": ("net", lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=NO_CONV1D)),
    "lokr-full-w2-alpha": ("net", lambda: peft.LoKrConfig(r=8, alpha=3, target_modules=NO_CONV1D)),
    "lokr-conv1d-decomposed-w2": ("net", lambda: peft.LoKrConfig(r=1, alpha=2, target_modules=["conv1d"])),
    # PEFT's factor order: 128 with factor 32 is (32, 4), not LyCORIS' (4, 32)
    "lokr-factor32": ("wide", lambda: peft.LoKrConfig(r=1, alpha=3, decompose_factor=32, target_modules=WIDE_LINEAR)),
    "lokr-factor32-full-w2": (
        "wide",
        lambda: peft.LoKrConfig(r=4, alpha=3, decompose_factor=32, target_modules=WIDE_LINEAR),
    ),
    "lokr-factor8-decompose_both": (
        "wide",
        lambda: peft.LoKrConfig(
            r=2, alpha=5, decompose_factor=8, decompose_both=True, target_modules=[*WIDE_LINEAR, "down", "conv"]
        ),
    ),
    "lokr-effective-conv2d": (
        "wide",
        lambda: peft.LoKrConfig(r=2, alpha=3, use_effective_conv2d=True, target_modules=["conv"]),
    ),
    "ia3-output-bias-free": ("net", lambda: peft.IA3Config(target_modules=["fc2", "conv2"], feedforward_modules=[])),
    "ia3-feedforward": (
        "net",
        lambda: peft.IA3Config(target_modules=["fc1", "fc2", "conv1", "conv2"], feedforward_modules=["fc1", "conv1"]),
    ),
    "ia3-gpt2-feedforward": (
        "gpt2",
        lambda: peft.IA3Config(target_modules=["c_proj"], feedforward_modules=["c_proj"], fan_in_fan_out=True),
    ),
    # output-scaled layers with a bias: PEFT scales it, (W x + b) ⊙ l, and so does the loaded adapter
    "ia3-output-biased": ("net", lambda: peft.IA3Config(target_modules=["fc1", "conv1"], feedforward_modules=[])),
    "ia3-gpt2-output-biased": (
        "gpt2",
        lambda: peft.IA3Config(
            target_modules=["c_attn", "c_proj"], feedforward_modules=["c_proj"], fan_in_fan_out=True
        ),
    ),
    "ia3-conv3d": ("volume", lambda: peft.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"])),
    # PEFT's input scaling of a grouped convolution: each group's output rows read that group's input channels
    "ia3-grouped-conv": ("grouped", lambda: peft.IA3Config(target_modules=["0", "2"], feedforward_modules=["2"])),
}

#: folders PEFT writes whose computation ours cannot reproduce: a ValueError naming why, model untouched
PEFT_TO_OURS_REFUSED = {
    # DoRA on an Embedding (PEFT has it; our DoRA needs a weight matrix to decompose)
    "lora-dora-embedding": (
        "net",
        lambda: peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=["emb"]),
        "DoRA needs a weight matrix",
    ),
    # PEFT's torch.kron of a 2-D W1 with a 3-D full W2 lays the Conv1d ΔW out its own way
    "lokr-conv1d-full-w2": (
        "net",
        lambda: peft.LoKrConfig(r=4, alpha=3, target_modules=["conv1d"]),
        "Conv1d Kronecker product with a full W2",
    ),
}


def _peft(kind: str, config: peft.PeftConfig) -> peft.PeftModel:
    torch.manual_seed(2)
    model = peft.get_peft_model(make(kind), config)
    randomize_peft(model)
    return model.eval()


@pytest.mark.parametrize("case", list(PEFT_TO_OURS))
def test_peft_to_ours(case: str, tmp_path: Path) -> None:
    kind, config = PEFT_TO_OURS[case]
    theirs = _peft(kind, config())
    x = inputs(kind)
    expected = run(kind, theirs, x)
    assert_adapted(kind, expected, x)
    theirs.save_pretrained(tmp_path)
    ours = bl.PeftModel.from_pretrained(make(kind), tmp_path)
    assert not ours.training
    assert_same(run(kind, ours, x), expected)


@pytest.mark.parametrize("case", list(PEFT_TO_OURS_REFUSED))
def test_peft_to_ours_refused(case: str, tmp_path: Path) -> None:
    """Never a silently different model: a ValueError naming the reason, with the model untouched."""
    kind, config, reason = PEFT_TO_OURS_REFUSED[case]
    theirs = _peft(kind, config())
    x = inputs(kind)
    assert_adapted(kind, run(kind, theirs, x), x)
    theirs.save_pretrained(tmp_path)
    base = make(kind)
    with pytest.raises(ValueError, match=reason):
        bl.PeftModel.from_pretrained(base, tmp_path)
    assert_untouched(base, kind)


def test_peft_to_ours_non_default_adapter(tmp_path: Path) -> None:
    """``model.add_adapter("second", cfg)`` in PEFT: the subfolder loads as ``second`` and matches PEFT."""
    theirs = peft.get_peft_model(make("net"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "conv1"]))
    theirs.add_adapter(
        "second", peft.LoraConfig(r=2, lora_alpha=3, use_dora=True, target_modules=["fc2", "conv1", "conv1d"])
    )
    torch.manual_seed(3)
    randomize_peft(theirs)
    theirs.eval()
    x = inputs("net")
    first = run("net", theirs, x)
    theirs.set_adapter("second")
    second = run("net", theirs, x)
    assert_adapted("net", second, x)
    theirs.save_pretrained(tmp_path)
    assert (tmp_path / "second" / WEIGHTS).is_file()

    ours = bl.PeftModel.from_pretrained(make("net"), tmp_path)
    assert_same(run("net", ours, x), first)
    ours.load_adapter(tmp_path / "second", adapter_name="second")
    ours.set_adapter("second")
    assert_same(run("net", ours, x), second)
    alone = bl.PeftModel.from_pretrained(make("net"), tmp_path / "second", adapter_name="second")
    assert alone.active_adapters == ["second"]
    assert_same(run("net", alone, x), second)


def test_peft_to_ours_non_default_loha(tmp_path: Path) -> None:
    theirs = peft.get_peft_model(make("net"), peft.LoHaConfig(r=2, alpha=3, target_modules=["fc1"]))
    theirs.add_adapter("second", peft.LoHaConfig(r=3, alpha=300, use_effective_conv2d=True, target_modules=NO_CONV1D))
    torch.manual_seed(4)
    randomize_peft(theirs)
    theirs.set_adapter("second")
    theirs.eval()
    x = inputs("net")
    expected = run("net", theirs, x)
    theirs.save_pretrained(tmp_path)
    ours = bl.PeftModel.from_pretrained(make("net"), tmp_path / "second", adapter_name="second")
    assert_same(run("net", ours, x), expected)


@pytest.mark.parametrize("field", ["lora_bias", "use_qalora"])
def test_peft_config_with_unsupported_field_refused(field: str, tmp_path: Path) -> None:
    theirs = _peft("net", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "conv1"]))
    theirs.save_pretrained(tmp_path)
    path = tmp_path / CONFIG
    data = json.loads(path.read_text())
    data[field] = True
    path.write_text(json.dumps(data))
    base = make("net")
    with pytest.raises(ValueError, match=field):
        bl.PeftModel.from_pretrained(base, tmp_path)
    assert_untouched(base, "net")


def test_peft_config_neutral_unknown_fields_accepted(tmp_path: Path) -> None:
    """The same fields at their neutral value (what PEFT itself writes) load normally."""
    theirs = _peft("net", peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "conv1"]))
    x = inputs("net")
    expected = run("net", theirs, x)
    theirs.save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG).read_text())
    assert data.get("lora_bias") is False and data.get("use_qalora") is False
    ours = bl.PeftModel.from_pretrained(make("net"), tmp_path)
    assert_same(run("net", ours, x), expected)
