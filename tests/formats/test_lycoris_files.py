"""Interop with the installed LyCORIS (``lycoris-lora``) through files, in both directions.

The model is built here: one block with Linear 64→128, Linear 128→64, Conv2d 32→64 3×3 (padding 1),
Conv2d 64→32 1×1 and Conv1d 16→24 k=3, nested as ``blocks.0.*`` so the file keys carry a dotted path
(``lycoris_blocks_0_fc1``).

(A) Files written by LyCORIS: ``create_lycoris`` + randomized module weights + ``apply_to`` gives
    LyCORIS's own output (eval, multiplier 1); ``save_weights`` writes the file;
    ``bl.PeftModel.from_pretrained`` on a fresh copy of the base must give the same output. The
    reference is LyCORIS's forward, not its merge: for LoHa/LoKr its ``get_diff_weight`` /
    ``merge_to`` apply alpha/r twice when alpha ≠ r, while its forward applies it once, as
    ComfyUI/A1111 do. One exception, documented where it happens: LyCORIS's DyLoRA forward samples a
    random rank even in eval and scales by alpha/(blocks+1), so it is no reference; DyLoRA is
    checked against the consumer formula ΔW = alpha/r · up @ down on LyCORIS's own parameters.
    Each case also reloads the file with LyCORIS (``create_lycoris_from_weights``): where LyCORIS can,
    its reload must equal its forward (the file carries all the forward used); where it cannot
    (LoKr + Tucker, (IA)³, conv DyLoRA, DoRA on input channels) the LyCORIS error is pinned, and ours
    must still load the file exactly.
(B) Files written by us (``save_pretrained``, default prefix ``lycoris`` = LyCORIS's ``LORA_PREFIX``)
    with randomized adapters: ``create_lycoris_from_weights`` + ``apply_to`` must reproduce our output.

LyCORIS's targeting is class-level state (``LycorisNetwork.apply_preset`` and ``create_lycoris``'s
preset write class attributes); an autouse fixture restores it after every test.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from lycoris import LycorisNetwork, create_lycoris, create_lycoris_from_weights
from lycoris.modules.dylora import DyLoraModule
from safetensors.torch import load_file
from torch import Tensor, nn

import beyondlora as bl

RTOL = 1e-5
ATOL = 1e-5
#: every output must move by at least this much under the adapter, so equality is not vacuous
MIN_EFFECT = 10 * ATOL

TARGETS = ["fc1", "fc2", "conv1", "conv2", "seq"]
MODULE_KEYS = {f"lycoris_blocks_0_{name}" for name in TARGETS}
LYCORIS_CLASS_STATE = (
    "ENABLE_CONV",
    "TARGET_REPLACE_MODULE",
    "TARGET_REPLACE_NAME",
    "LORA_PREFIX",
    "MODULE_ALGO_MAP",
    "NAME_ALGO_MAP",
    "USE_FNMATCH",
    "TARGET_EXCLUDE_NAME",
)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 64)
        self.conv1 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv2 = nn.Conv2d(64, 32, 1)
        self.seq = nn.Conv1d(16, 24, 3)

    def forward(self, x: Tensor, img: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.fc2(F.gelu(self.fc1(x))), self.conv2(F.relu(self.conv1(img))), self.seq(s)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block()])

    def forward(self, x: Tensor, img: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.blocks[0](x, img, s)


def make_base() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().float().eval()


def make_inputs() -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (
        torch.randn(3, 64, generator=generator),
        torch.randn(2, 32, 8, 8, generator=generator),
        torch.randn(2, 16, 10, generator=generator),
    )


@torch.no_grad()
def run(model: nn.Module, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(out.clone() for out in model(*inputs))


def assert_outputs_close(actual: tuple[Tensor, ...], expected: tuple[Tensor, ...]) -> None:
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def assert_adapter_acts(adapted: tuple[Tensor, ...], plain: tuple[Tensor, ...]) -> None:
    """Every output (fc path, conv path, conv1d path) is changed by the adapter."""
    for got, base in zip(adapted, plain, strict=True):
        assert (got - base).abs().max().item() > MIN_EFFECT


@pytest.fixture(autouse=True)
def _restore_lycoris_class_state():
    saved = {name: copy.copy(getattr(LycorisNetwork, name)) for name in LYCORIS_CLASS_STATE}
    yield
    for name, value in saved.items():
        setattr(LycorisNetwork, name, value)


def module_tensors(path: Path) -> dict[str, dict[str, Tensor]]:
    grouped: dict[str, dict[str, Tensor]] = {}
    for key, tensor in load_file(str(path)).items():
        module, _, name = key.partition(".")
        grouped.setdefault(module, {})[name] = tensor
    return grouped


# --- (A) files written by LyCORIS ------------------------------------------------------------------


@dataclass(frozen=True)
class LycorisCase:
    id: str
    algo: str
    options: dict[str, Any] = field(default_factory=dict)
    linear_dim: int = 4
    linear_alpha: float = 2.0
    conv_dim: int = 4
    conv_alpha: float = 3.0
    #: preset ``module_algo_map`` (per-class module options LyCORIS only takes from a preset)
    module_algo_map: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: {module suffix: tensor names that module's entry must hold exactly} — pins the layout under test
    layouts: dict[str, set[str]] = field(default_factory=dict)
    #: the error LyCORIS raises reloading its own file (a LyCORIS defect), None when it reloads
    reload_error: type[Exception] | None = None
    reload_match: str = ""


LORA = {"lora_down.weight", "lora_up.weight", "alpha"}
LORA_TUCKER = LORA | {"lora_mid.weight"}
LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
LOHA_TUCKER = LOHA | {"hada_t1", "hada_t2"}
LOKR_W2_LOW_RANK = {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}
LOKR_BOTH_FULL = {"lokr_w1", "lokr_w2", "alpha"}
LOKR_BOTH_DECOMPOSED = {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"}
IA3 = {"weight", "on_input"}
FULL = {"diff", "diff_b"}
DORA = {"dora_scale"}
GLORA = {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}

LYCORIS_CASES = [
    LycorisCase("lora", "lora", layouts={"fc1": LORA, "conv1": LORA, "seq": LORA}),
    LycorisCase(
        "lora-tucker", "lora", {"use_tucker": True}, layouts={"fc1": LORA, "conv1": LORA_TUCKER, "conv2": LORA}
    ),
    LycorisCase("loha", "loha", layouts={"fc1": LOHA, "conv1": LOHA, "seq": LOHA}),
    LycorisCase(
        "loha-tucker", "loha", {"use_tucker": True}, layouts={"conv1": LOHA_TUCKER, "seq": LOHA_TUCKER, "conv2": LOHA}
    ),
    # factor -1, rank 4: the Linears get a low-rank W2; every conv gets both factors full, where
    # LyCORIS forces scale 1 (here with alpha 3 ≠ rank 4)
    LycorisCase(
        "lokr",
        "lokr",
        {"factor": -1},
        layouts={"fc1": LOKR_W2_LOW_RANK, "conv1": LOKR_BOTH_FULL, "seq": LOKR_BOTH_FULL},
    ),
    LycorisCase("lokr-factor4", "lokr", {"factor": 4}, layouts={"fc1": LOKR_W2_LOW_RANK, "conv1": LOKR_W2_LOW_RANK}),
    LycorisCase(
        "lokr-decompose-both",
        "lokr",
        {"decompose_both": True},
        linear_dim=2,
        linear_alpha=1.0,
        conv_dim=2,
        layouts={"fc1": LOKR_BOTH_DECOMPOSED, "conv1": LOKR_BOTH_DECOMPOSED},
    ),
    # LyCORIS reads the rank of a Tucker LoKr from w2_a's second dim, which is the output factor there
    LycorisCase(
        "lokr-tucker",
        "lokr",
        {"use_tucker": True},
        conv_dim=2,
        conv_alpha=1.0,
        layouts={"conv1": {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}, "fc1": LOKR_W2_LOW_RANK},
        reload_error=AttributeError,
        reload_match="lokr_w2_a",
    ),
    # a dim so big that W2 is full everywhere: both full, LyCORIS forces scale 1 (alpha 2 ≠ dim)
    LycorisCase(
        "lokr-w2-full",
        "lokr",
        linear_dim=10000,
        conv_dim=10000,
        layouts={name: LOKR_BOTH_FULL for name in TARGETS},
    ),
    # IA3Module.make_module_from_state_dict takes (weight) but is handed (weight, on_input)
    LycorisCase(
        "ia3",
        "ia3",
        layouts={"fc1": IA3, "conv1": IA3},
        reload_error=TypeError,
        reload_match="make_module_from_state_dict",
    ),
    LycorisCase(
        "ia3-on-input",
        "ia3",
        module_algo_map={"Linear": {"algo": "ia3", "train_on_input": True}},
        layouts={"fc1": IA3, "conv1": IA3},
        reload_error=TypeError,
        reload_match="make_module_from_state_dict",
    ),
    LycorisCase("full", "full", layouts={name: FULL for name in TARGETS}),
    LycorisCase("glora", "glora", layouts={name: GLORA for name in TARGETS}),
    # GLoRAModule drops use_tucker on every k×k conv (it keeps it only where all kernel sizes are 1, where it
    # has no effect), so its files never hold bm.weight
    LycorisCase("glora-tucker", "glora", {"use_tucker": True}, layouts={name: GLORA for name in TARGETS}),
    # conv DyLoRA saves lora_up as (out, r), which LyCORIS's LoCon cannot copy into (out, r, 1, 1)
    LycorisCase(
        "dylora",
        "dylora",
        {"block_size": 4},
        linear_dim=8,
        conv_dim=8,
        layouts={"fc1": LORA, "conv1": LORA, "seq": LORA},
        reload_error=RuntimeError,
        reload_match="doesn't match the broadcast shape",
    ),
    LycorisCase("lora-dora", "lora", {"dora_wd": True}, layouts={"fc1": LORA | DORA, "conv1": LORA | DORA}),
    LycorisCase("loha-dora", "loha", {"dora_wd": True}, layouts={"fc1": LOHA | DORA, "conv1": LOHA | DORA}),
    LycorisCase(
        "lokr-dora",
        "lokr",
        {"dora_wd": True},
        layouts={"fc1": LOKR_W2_LOW_RANK | DORA, "conv1": LOKR_BOTH_FULL | DORA},
    ),
    # magnitude per input channel: LyCORIS's loader does not pass wd_on_out, so it builds a (out, 1…)
    # magnitude and cannot copy the (1, in, …) one of its own file into it
    LycorisCase(
        "lora-dora-on-input",
        "lora",
        {"dora_wd": True, "wd_on_output": False},
        layouts={"fc1": LORA | DORA, "conv1": LORA | DORA},
        reload_error=RuntimeError,
        reload_match="doesn't match the broadcast shape",
    ),
]


def randomize_lycoris(network: LycorisNetwork) -> None:
    """Non-zero ΔW: factors N(0, 0.2²), DoRA magnitudes times (1 + 0.1·N(0, 1))."""
    with torch.no_grad():
        for module in network.loras:
            for name, param in module.named_parameters():
                if name == "dora_scale":
                    param.mul_(1 + 0.1 * torch.randn_like(param))
                else:
                    nn.init.normal_(param, std=0.2)


def dylora_reference(base: TinyNet, network: LycorisNetwork) -> TinyNet:
    """The consumer's ΔW = alpha / r · up @ down, from LyCORIS's DyLoRA parameters, added to a copy."""
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for module in network.loras:
            assert isinstance(module, DyLoraModule)
            up = torch.cat(list(module.up_list), dim=1)
            down = torch.cat(list(module.down_list), dim=0)
            delta = (float(module.alpha) / module.lora_dim) * (up @ down)
            name = module.lora_name.removeprefix("lycoris_blocks_0_")
            target = getattr(reference.blocks[0], name)
            target.weight += delta.reshape(target.weight.shape)
    return reference


@pytest.mark.parametrize("case", LYCORIS_CASES, ids=lambda case: case.id)
def test_lycoris_file_loads_with_lycoris_output(case: LycorisCase, tmp_path: Path) -> None:
    base = make_base()
    inputs = make_inputs()
    plain = run(base, inputs)

    LycorisNetwork.apply_preset(
        {
            "target_module": ["Linear", "Conv1d", "Conv2d"],
            "target_name": [],
            "module_algo_map": case.module_algo_map,
            "lora_prefix": "lycoris",
        }
    )
    theirs = copy.deepcopy(base)
    torch.manual_seed(2)
    network = create_lycoris(
        theirs,
        1.0,
        case.linear_dim,
        case.linear_alpha,
        algo=case.algo,
        conv_dim=case.conv_dim,
        conv_alpha=case.conv_alpha,
        **case.options,
    )
    assert {module.lora_name for module in network.loras} == MODULE_KEYS
    randomize_lycoris(network)
    network.apply_to()
    network.eval()
    lycoris_output = run(theirs, inputs)

    if case.algo == "dylora":
        # LyCORIS's DyLoRA forward draws a random rank block even in eval and scales by
        # alpha / (blocks + 1), not alpha / r, so its forward is no reference here (and it disagrees
        # with the consumer formula whatever block it draws).
        expected = run(dylora_reference(base, network), inputs)
        assert any(
            not torch.allclose(got, want, rtol=RTOL, atol=ATOL)
            for got, want in zip(lycoris_output, expected, strict=True)
        )
    else:
        expected = lycoris_output
    assert_adapter_acts(expected, plain)

    path = tmp_path / f"{case.id}.safetensors"
    network.save_weights(str(path), torch.float32, {})
    saved = module_tensors(path)
    assert set(saved) == MODULE_KEYS
    for suffix, names in case.layouts.items():
        assert set(saved[f"lycoris_blocks_0_{suffix}"]) == names, suffix
    if case.module_algo_map:
        assert int(saved["lycoris_blocks_0_fc1"]["on_input"]) == 1
        assert int(saved["lycoris_blocks_0_conv1"]["on_input"]) == 0

    peft = bl.PeftModel.from_pretrained(copy.deepcopy(base), path)
    assert_outputs_close(run(peft, inputs), expected)

    reloaded = copy.deepcopy(base)
    if case.reload_error is None:
        again, _ = create_lycoris_from_weights(1.0, str(path), reloaded)
        again.apply_to()
        again.eval()
        assert len(again.loras) == len(MODULE_KEYS)
        assert_outputs_close(run(reloaded, inputs), lycoris_output)
    else:
        with pytest.raises(case.reload_error, match=case.reload_match):
            create_lycoris_from_weights(1.0, str(path), reloaded)


# --- (B) files written by us, loaded by LyCORIS ----------------------------------------------------


@dataclass(frozen=True)
class OursCase:
    id: str
    config: bl.AdapterConfig
    #: {module suffix: tensor names that module's entry must hold exactly}
    layouts: dict[str, set[str]] = field(default_factory=dict)
    #: the error LyCORIS raises loading the file (a LyCORIS defect), None when it loads
    load_error: type[Exception] | None = None
    load_match: str = ""


OURS_CASES = [
    OursCase("lora", bl.LoraConfig(r=4, alpha=2, target_modules=TARGETS), {"fc1": LORA, "conv1": LORA, "seq": LORA}),
    OursCase(
        "lora-tucker",
        bl.LoraConfig(r=4, alpha=2, use_effective_conv2d=True, target_modules=TARGETS),
        {"fc1": LORA, "conv1": LORA_TUCKER, "seq": LORA_TUCKER, "conv2": LORA},
    ),
    OursCase("loha", bl.LoHaConfig(r=4, alpha=2, target_modules=TARGETS), {"fc1": LOHA, "conv1": LOHA, "seq": LOHA}),
    OursCase(
        "loha-tucker",
        bl.LoHaConfig(r=4, alpha=2, use_effective_conv2d=True, target_modules=TARGETS),
        {"conv1": LOHA_TUCKER, "seq": LOHA_TUCKER, "fc1": LOHA},
    ),
    # Linears: decomposed W2 with alpha ≠ r; convs: both factors full with alpha ≠ r (scale baked into W1)
    OursCase(
        "lokr",
        bl.LoKrConfig(r=4, alpha=2, target_modules=TARGETS),
        {"fc1": LOKR_W2_LOW_RANK, "fc2": LOKR_W2_LOW_RANK, "conv1": LOKR_BOTH_FULL, "seq": LOKR_BOTH_FULL},
    ),
    OursCase(
        "lokr-factor4",
        bl.LoKrConfig(r=4, alpha=2, decompose_factor=4, target_modules=TARGETS),
        {"fc1": LOKR_W2_LOW_RANK, "conv1": LOKR_W2_LOW_RANK},
    ),
    OursCase(
        "lokr-decompose-both",
        bl.LoKrConfig(r=2, alpha=3, decompose_both=True, target_modules=TARGETS),
        {"fc1": LOKR_BOTH_DECOMPOSED, "conv1": LOKR_BOTH_DECOMPOSED},
    ),
    OursCase(
        "lokr-both-full",
        bl.LoKrConfig(r=64, alpha=2, target_modules=TARGETS),
        {name: LOKR_BOTH_FULL for name in TARGETS},
    ),
    # a Tucker W2 is written rebuilt as a full lokr_w2, which every consumer applies (LyCORIS too: it cannot
    # reload lokr_t2 files, ComfyUI cannot apply them)
    OursCase(
        "lokr-tucker",
        bl.LoKrConfig(r=2, alpha=1, use_effective_conv2d=True, target_modules=TARGETS),
        {"conv1": LOKR_BOTH_FULL},
    ),
    OursCase(
        "lora-dora",
        bl.LoraConfig(r=4, alpha=2, use_dora=True, target_modules=TARGETS),
        {"fc1": LORA | DORA, "conv1": LORA | DORA},
    ),
    OursCase(
        "loha-dora",
        bl.LoHaConfig(r=4, alpha=2, use_dora=True, target_modules=TARGETS),
        {"fc1": LOHA | DORA, "conv1": LOHA | DORA},
    ),
    OursCase(
        "lokr-dora",
        bl.LoKrConfig(r=4, alpha=2, use_dora=True, target_modules=TARGETS),
        {"fc1": LOKR_W2_LOW_RANK | DORA, "conv1": LOKR_BOTH_FULL | DORA},
    ),
    OursCase(
        "dylora",
        bl.DyLoraConfig(r=8, alpha=2, block_size=4, target_modules=TARGETS),
        {"fc1": LORA, "conv1": LORA},
    ),
    OursCase("full", bl.FullConfig(target_modules=TARGETS), {name: FULL for name in TARGETS}),
    OursCase("glora", bl.GLoRAConfig(r=4, alpha=2, target_modules=TARGETS), {name: GLORA for name in TARGETS}),
    # rs-LoRA's alpha / √r is folded into the file's alpha: LyCORIS' alpha / r gives it exactly
    OursCase(
        "glora-rslora",
        bl.GLoRAConfig(r=4, alpha=2, use_rslora=True, target_modules=TARGETS),
        {"fc1": GLORA, "conv1": GLORA},
    ),
    # GLoRAModule rebuilt from a bm.weight file drops use_tucker on the k×k conv and has no bm to copy into
    OursCase(
        "glora-tucker",
        bl.GLoRAConfig(r=4, alpha=2, use_effective_conv2d=True, target_modules=TARGETS),
        {"conv1": GLORA | {"bm.weight"}, "seq": GLORA | {"bm.weight"}, "fc1": GLORA, "conv2": GLORA},
        load_error=AttributeError,
        load_match="bm",
    ),
    # IA3Module.make_module_from_state_dict takes (weight) but is handed (weight, on_input)
    OursCase(
        "ia3",
        bl.IA3Config(target_modules=TARGETS, feedforward_modules=["fc2"]),
        {"fc1": IA3, "fc2": IA3, "conv1": IA3},
        load_error=TypeError,
        load_match="make_module_from_state_dict",
    ),
]


def randomize_ours(peft: bl.PeftModel) -> None:
    """Adapter parameters N(0, 0.1²); DoRA magnitudes times (1 + 0.1·N(0, 1))."""
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if not param.requires_grad:
                continue
            if name.endswith("dora_scale"):
                param.mul_(1 + 0.1 * torch.randn_like(param))
            else:
                nn.init.normal_(param, std=0.1)


@pytest.mark.parametrize("case", OURS_CASES, ids=lambda case: case.id)
def test_our_file_loads_into_lycoris_with_our_output(case: OursCase, tmp_path: Path) -> None:
    base = make_base()
    inputs = make_inputs()
    plain = run(base, inputs)

    peft = bl.get_peft_model(copy.deepcopy(base), case.config)
    torch.manual_seed(3)
    randomize_ours(peft)
    peft.eval()
    ours = run(peft, inputs)
    assert_adapter_acts(ours, plain)

    path = tmp_path / f"{case.id}.safetensors"
    peft.save_pretrained(path)
    saved = module_tensors(path)
    assert set(saved) == MODULE_KEYS
    for suffix, names in case.layouts.items():
        assert set(saved[f"lycoris_blocks_0_{suffix}"]) == names, suffix

    # ours reads its own file back to the same output
    again = bl.PeftModel.from_pretrained(copy.deepcopy(base), path)
    assert_outputs_close(run(again, inputs), ours)

    theirs = copy.deepcopy(base)
    if case.load_error is not None:
        with pytest.raises(case.load_error, match=case.load_match):
            create_lycoris_from_weights(1.0, str(path), theirs)
        return
    network, _ = create_lycoris_from_weights(1.0, str(path), theirs)
    assert {module.lora_name for module in network.loras} == MODULE_KEYS
    network.apply_to()
    network.eval()
    assert_outputs_close(run(theirs, inputs), ours)
