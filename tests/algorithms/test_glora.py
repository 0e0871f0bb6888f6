"""GLoRA against the installed LyCORIS (``lycoris.modules.glora.GLoRAModule``) in both directions, against the UIs'
file formula, and its refusals (DoRA, PEFT folders, malformed files).

LyCORIS' ΔW is ``get_diff_weight(multiplier)``; the LyCORIS module and ours hold the same random parameters in
float64.  LyCORIS' constructor drops ``use_tucker`` on every k×k convolution (it keeps it only where all kernel
sizes are 1, where it changes nothing), so Tucker GLoRA has no LyCORIS counterpart: its parity is the
independent reference of the core matrix, and LyCORIS' failure to load a ``bm.weight`` file is pinned.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from lycoris import LycorisNetwork, create_lycoris_from_weights
from lycoris.modules.glora import GLoRAModule
from peft import GloraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

import beyondlora as bl
from beyondlora.algorithms import GLoRA
from beyondlora.algorithms.common import AdapterOptions
from beyondlora.errors import FormatError
from beyondlora.formats.lycoris_codecs import export_tensors
from beyondlora.formats.single_file import group_by_module
from beyondlora.ops.geometry import LayerGeometry
from helpers.ui_formula import a1111_delta, comfyui_delta, ui_delta

DTYPE = torch.float64
LAYERS = {
    "linear": lambda: nn.Linear(12, 20, dtype=DTYPE),
    "conv2d": lambda: nn.Conv2d(6, 10, 3, padding=1, dtype=DTYPE),
    "conv1d": lambda: nn.Conv1d(5, 7, 3, stride=2, dtype=DTYPE),
}
OPTIONS = {"plain": dict(r=3, alpha=2.0), "rslora": dict(r=4, alpha=3.0, use_rslora=True)}


def _theirs(layer: nn.Module, r: int, alpha: float, rs_lora: bool = False) -> GLoRAModule:
    torch.manual_seed(0)
    module = GLoRAModule("lycoris_layer", layer, 1.0, r, alpha, rs_lora=rs_lora).to(DTYPE)
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0.0, 0.3)
    return module


def _ours(layer: nn.Module, options: AdapterOptions, seed: int = 1, multiplier: float = 1.0) -> GLoRA:
    torch.manual_seed(seed)
    adapter = GLoRA(LayerGeometry.of(layer), options, layer.weight.detach()).to(DTYPE)
    with torch.no_grad():
        for param in adapter.parameters():
            param.normal_(0.0, 0.3)
    adapter.multiplier = multiplier
    return adapter


@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_lycoris_module_delta_and_tensors_equal_ours(layer_name: str, option: str) -> None:
    layer = LAYERS[layer_name]()
    opts = OPTIONS[option]
    theirs = _theirs(layer, opts["r"], opts["alpha"], opts.get("use_rslora", False))
    saved = {k: v for k, v in theirs.state_dict().items() if k != "scalar"}
    state, fields = GLoRA.read_file(saved, LayerGeometry.of(layer), "lycoris_layer", None)
    assert fields == dict(r=opts["r"], alpha=opts["alpha"], use_effective_conv2d=False)
    ours = GLoRA(LayerGeometry.of(layer), AdapterOptions(**opts), layer.weight.detach()).to(DTYPE)
    ours.load_state_dict(state)
    expected = theirs.get_diff_weight(1.0)[0]
    weight = layer.weight.detach()
    torch.testing.assert_close(ours.delta_weight(weight), expected, rtol=1e-10, atol=1e-12)
    # our file tensors carry LyCORIS' names and shapes (alpha folds rs-LoRA's alpha / √r into alpha / r)
    exported = export_tensors(ours)
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in saved.items()}
    # LyCORIS' forward adds exactly that ΔW
    x = (
        torch.randn(2, 12, dtype=DTYPE)
        if layer_name == "linear"
        else torch.randn(2, layer.in_channels, *[9] * (layer.weight.dim() - 2), dtype=DTYPE)
    )
    with torch.no_grad():
        torch.testing.assert_close(
            theirs(x), layer(x) + LayerGeometry.of(layer).apply(x, expected), rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("multiplier", [1.0, 0.5])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("layer_name", list(LAYERS))
def test_our_tensors_rebuilt_by_lycoris_give_our_delta(layer_name: str, option: str, multiplier: float) -> None:
    layer = LAYERS[layer_name]()
    ours = _ours(layer, AdapterOptions(**OPTIONS[option]), multiplier=multiplier)
    weight = layer.weight.detach()
    tensors = export_tensors(ours)
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)  # LyCORIS builds its module in the default dtype, then copies the tensors in
    try:
        theirs = GLoRAModule.make_module_from_state_dict(
            "lycoris_layer", layer, *(tensors[f"{n}.weight"] for n in ("a1", "a2", "b1", "b2")), None, tensors["alpha"]
        )
    finally:
        torch.set_default_dtype(default)
    expected = ours.effective_delta(weight)[0]
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(theirs.get_diff_weight(1.0)[0], expected, rtol=1e-10, atol=1e-12)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 20)
        self.conv = nn.Conv2d(6, 10, 3, padding=1)

    def forward(self, x: Tensor, img: Tensor) -> tuple[Tensor, Tensor]:
        return self.fc(x), self.conv(img)


def _inputs() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(5)
    return torch.randn(3, 12, generator=generator), torch.randn(2, 6, 7, 7, generator=generator)


def _trained(config: bl.AdapterConfig, multiplier: float = 1.0) -> tuple[nn.Module, bl.PeftModel]:
    torch.manual_seed(0)
    base = Net().eval()
    peft = bl.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for param in peft.parameters():
            if param.requires_grad:
                param.normal_(0.0, 0.2)
    peft.set_multiplier(multiplier)
    return base, peft.eval()


@pytest.fixture
def _lycoris_state():
    saved = {name: copy.copy(value) for name, value in vars(LycorisNetwork).items() if name.isupper()}
    yield
    for name, value in saved.items():
        setattr(LycorisNetwork, name, value)


@pytest.mark.usefixtures("_lycoris_state")
def test_our_rslora_file_at_half_strength_loads_into_lycoris_with_our_output(tmp_path: Path) -> None:
    base, peft = _trained(bl.GLoRAConfig(r=4, alpha=3.0, use_rslora=True, target_modules=["fc", "conv"]), 0.5)
    inputs = _inputs()
    with torch.no_grad():
        ours, plain = peft(*inputs), base(*inputs)
    assert all((o - p).abs().max() > 1e-3 for o, p in zip(ours, plain, strict=True))
    path = tmp_path / "glora.safetensors"
    with pytest.warns(UserWarning, match="AUTOMATIC1111 applies an older GLoRA layout"):
        peft.save_pretrained(path)
    theirs = copy.deepcopy(base)
    network, _ = create_lycoris_from_weights(1.0, str(path), theirs)
    assert {type(m) for m in network.loras} == {GLoRAModule}
    network.apply_to()
    network.eval()
    with torch.no_grad():
        for got, want in zip(theirs(*inputs), ours, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    again = bl.PeftModel.from_pretrained(copy.deepcopy(base), path)
    with torch.no_grad():
        for got, want in zip(again(*inputs), ours, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _grouped(path: Path) -> dict[str, dict[str, Tensor]]:
    return group_by_module(load_file(path))


def _our_delta(peft: bl.PeftModel, name: str) -> Tensor:
    layer = peft.base_model.get_submodule(name)
    layer.adapters["default"].double()
    weight = layer.geometry.canonical_weight(layer.base_layer).detach().double()
    return layer.effective_delta("default", weight)[0]


@pytest.mark.parametrize("options", [dict(r=4, alpha=2.0), dict(r=2, alpha=5.0, use_rslora=True)])
@pytest.mark.parametrize("multiplier", [1.0, 0.7])
def test_the_ui_formula_and_comfyui_apply_our_files_exactly(options: dict, multiplier: float, tmp_path: Path) -> None:
    _, peft = _trained(bl.GLoRAConfig(**options, target_modules=["fc", "conv"]), multiplier)
    with pytest.warns(UserWarning) as caught:
        peft.save_pretrained(tmp_path / "a.safetensors")
    assert "ComfyUI ignores" not in str(caught[0].message)
    grouped = _grouped(tmp_path / "a.safetensors")
    for name in ("fc", "conv"):
        weight = peft.base_model.get_submodule(name).base_layer.weight.detach().double()
        ours = _our_delta(peft, name)
        for consumer in (ui_delta, comfyui_delta):
            delta, _ = consumer(grouped[f"lycoris_{name}"], weight.clone())
            torch.testing.assert_close(delta, ours, rtol=1e-5, atol=1e-6, msg=consumer.__name__)
        assert a1111_delta(grouped[f"lycoris_{name}"], weight)[0].abs().max() == 0  # the caveat: it raises


def test_tucker_files_warn_that_comfyui_skips_them_and_strict_refuses(tmp_path: Path) -> None:
    config = bl.GLoRAConfig(r=2, alpha=1.0, use_effective_conv2d=True, target_modules=["fc", "conv"])
    _, peft = _trained(config)
    with pytest.warns(UserWarning, match="ComfyUI ignores GLoRA's Tucker core") as caught:
        peft.save_pretrained(tmp_path / "t.safetensors")
    assert "1 module(s) (conv)" in str(caught[0].message)
    grouped = _grouped(tmp_path / "t.safetensors")
    assert set(grouped["lycoris_conv"]) == {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight", "alpha"}
    weight = peft.base_model.conv.base_layer.weight.detach().double()
    ours = _our_delta(peft, "conv")
    torch.testing.assert_close(ui_delta(grouped["lycoris_conv"], weight)[0], ours, rtol=1e-5, atol=1e-6)
    assert (comfyui_delta(grouped["lycoris_conv"], weight)[0] - ours).norm() > 0.1 * ours.norm()
    with pytest.raises(FormatError, match="strict=True"):
        peft.save_pretrained(tmp_path / "strict.safetensors", strict=True)
    assert not (tmp_path / "strict.safetensors").exists()


# --- refusals ---------------------------------------------------------------------------------------------
def test_dora_is_refused_everywhere() -> None:
    with pytest.raises(ValueError, match="GLoRA has no DoRA form"):
        bl.GLoRAConfig(use_dora=True, target_modules=["fc"])
    from beyondlora.algorithms.config_base import build_config

    with pytest.raises(ValueError, match="use_dora does not apply to algorithm glora"):
        build_config("glora", target_modules=["fc"], use_dora=True)
    with pytest.raises(ValueError, match="dropout does not apply to algorithm glora"):
        build_config("glora", target_modules=["fc"], dropout=0.1)
    with pytest.raises(ValueError, match="GLoRA has no DoRA form"):
        GLoRA(LayerGeometry.of(nn.Linear(3, 4)), AdapterOptions(r=2, use_dora=True), torch.zeros(4, 3))


def test_peft_folders_are_refused_both_ways(tmp_path: Path) -> None:
    base, peft = _trained(bl.GLoRAConfig(r=2, target_modules=["fc"]))
    with pytest.raises(FormatError, match="PEFT's GLoRA is another method.*save to a .safetensors file"):
        peft.save_pretrained(tmp_path / "ours")
    assert not (tmp_path / "ours" / "adapter_model.safetensors").exists()
    theirs = get_peft_model(copy.deepcopy(base), GloraConfig(r=2, target_modules=["fc"]))
    theirs.save_pretrained(tmp_path / "peft")
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FormatError, match="a GLORA folder cannot be loaded: PEFT's GLoRA is another method"):
        bl.PeftModel.from_pretrained(model, tmp_path / "peft")
    assert not any(isinstance(m, bl.AdapterLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "key, change, message",
    [
        (
            "a1.weight",
            lambda t: t.reshape(t.shape[1], t.shape[0]),
            r"lycoris_fc \(module 'fc'\): a1.weight has shape \(2, 12\), expected \(12, 2\)",
        ),
        (
            "b2.weight",
            lambda t: t[:, :-1],
            r"lycoris_fc \(module 'fc'\): b2.weight has shape \(2, 11\), expected \(2, 12\)",
        ),
        (
            "b1.weight",
            lambda t: torch.cat([t, t], 1),
            r"lycoris_fc \(module 'fc'\): b1.weight has shape \(20, 4\), expected \(20, 2\)",
        ),
        (
            "bm.weight",
            lambda t: torch.zeros(2, 2, 3, 3),
            r"lycoris_fc \(module 'fc'\): bm.weight has shape \(2, 2, 3, 3\), expected \(2, 2\)",
        ),
        ("a2.weight", None, r"lycoris_fc \(module 'fc'\): missing tensor 'a2.weight'"),
    ],
)
def test_malformed_files_name_module_key_and_shape_and_change_nothing(key, change, message, tmp_path: Path) -> None:
    base, peft = _trained(bl.GLoRAConfig(r=2, target_modules=["fc", "conv"]))
    path = tmp_path / "good.safetensors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.save_pretrained(path)
    tensors = load_file(path)
    full = f"lycoris_fc.{key}"
    if change is None:
        del tensors[full]
    else:
        tensors[full] = change(tensors.get(full, torch.zeros(0))).contiguous()
    save_file(tensors, tmp_path / "bad.safetensors")
    model = copy.deepcopy(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FormatError, match=message):
        bl.PeftModel.from_pretrained(model, tmp_path / "bad.safetensors")
    assert not any(isinstance(m, bl.AdapterLayer) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# --- the cost model -----------------------------------------------------------------------------------------
def test_the_bypass_is_priced_without_a_second_base_op_and_embeddings_take_the_combined_path() -> None:
    """Linear 64 → 64, r = 4: the bypass does t · (3 · 4 · 64 + 4 · 64 + 64) multiply-adds (the A and B
    hiddens, b1, and x + A x, which the layer's own base call takes), the rebuild 3 · 4 · 64 · 64 = 49,152:
    inference keeps the bypass for one row (1,088) and rebuilds for 64 rows (69,632)."""
    model = bl.get_peft_model(nn.Sequential(nn.Linear(64, 64)), bl.GLoRAConfig(r=4, target_modules=["0"]))
    (host,) = [m for m in model.modules() if isinstance(m, bl.AdapterLayer)]
    adapter = host.adapters["default"]
    assert adapter.bypass_flops(10) == 10 * (3 * 4 * 64 + 4 * 64 + 64)
    assert adapter.rebuild_flops() == 3 * 4 * 64 * 64
    with torch.no_grad():
        assert host._path(torch.randn(1, 64), ["default"]) == "bypass"
        assert host._path(torch.randn(64, 64), ["default"]) == "combined"
    table = bl.get_peft_model(nn.Sequential(nn.Embedding(30, 8)), bl.GLoRAConfig(r=2, target_modules=["0"]))
    (host,) = [m for m in table.modules() if isinstance(m, bl.AdapterLayer)]
    host.forward_mode = "bypass"  # A x of an index is a dense column the lookup cannot take: no bypass
    assert not host.adapters["default"].has_exact_bypass()
    assert host._path(torch.tensor([[1, 2, 3]]), ["default"]) == "combined"


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


SHIFT_LAYERS = [
    (lambda: nn.Linear(12, 16), (3, 5, 12)),
    (lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1, padding_mode="reflect"), (2, 4, 7, 6)),
]


@pytest.mark.parametrize("make, shape", SHIFT_LAYERS, ids=["linear", "conv"])
def test_the_bypass_folds_a_x_into_the_one_base_call(make, shape) -> None:
    """GLoRA's bypass runs the base layer once, on x + t·s·A x (LyCORIS' form), and equals W' x + b from the
    float64 weight W + t·ΔW written out here."""
    torch.manual_seed(0)
    base = _Holder(make()).double()
    model = bl.get_peft_model(
        copy.deepcopy(base), bl.GLoRAConfig(r=2, alpha=3.0, target_modules=["layer"], init_weights=False)
    )
    model.set_multiplier(0.7)
    (host,) = [m for m in model.modules() if isinstance(m, bl.AdapterLayer)]
    host.forward_mode = "bypass"
    calls = []
    host.base_layer.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(shape, dtype=torch.float64)
    adapter = host.adapters["default"]
    w = base.layer.weight.detach()
    flat = w.reshape(w.shape[0], -1) if w.dim() == 2 else w
    a = adapter.a1.detach().reshape(w.shape[1], -1) @ adapter.a2.detach().reshape(-1, w.shape[1])
    b = adapter.b1.detach().reshape(w.shape[0], -1) @ adapter.b2.detach().reshape(adapter.rank, -1)
    delta = torch.einsum("oi...,ij->oj...", flat, a) + b.reshape(w.shape)
    expected_layer = copy.deepcopy(base.layer)
    with torch.no_grad():
        expected_layer.weight += 0.7 * 1.5 * delta
    out = model(x)
    assert len(calls) == 1
    torch.testing.assert_close(out, expected_layer(x), rtol=1e-10, atol=1e-10)
    out.sum().backward()  # the base call's input is rebuilt from x in backward: gradients flow
    assert all(p.grad is not None for p in adapter.parameters())


@pytest.mark.parametrize("make, shape", SHIFT_LAYERS, ids=["linear", "conv"])
@pytest.mark.parametrize("other", ["ia3", "oft"])
def test_beside_an_adapter_that_reads_the_base_output(make, shape, other: str) -> None:
    """With (IA)³ scaling the output or OFT rotating it on the same layer, A x cannot join the base call: the
    bypass takes GLoRA's own base op and still equals the combined path."""
    torch.manual_seed(0)
    model = bl.get_peft_model(
        _Holder(make()).double(), bl.GLoRAConfig(r=2, target_modules=["layer"], init_weights=False)
    )
    second = {"ia3": bl.IA3Config, "oft": bl.OFTConfig}[other]
    model.add_adapter("second", second(target_modules=["layer"], init_weights=False))
    model.set_adapter(["default", "second"])
    (host,) = [m for m in model.modules() if isinstance(m, bl.AdapterLayer)]
    x = torch.randn(shape, dtype=torch.float64)
    outputs = {}
    for mode in ("bypass", "combined"):
        host.forward_mode = mode
        outputs[mode] = model(x)
    torch.testing.assert_close(outputs["bypass"], outputs["combined"], rtol=1e-10, atol=1e-10)
