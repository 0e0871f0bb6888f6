"""The single file: what a UI computes from our file equals our forward; reload is exact; bad files fail cleanly."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import beyondlora as bl
from beyondlora.errors import FormatError
from helpers.layer_cases import LAYERS, Case, all_cases, build, randomize
from helpers.ui_formula import ui_delta


def _unscalable(case: Case) -> bool:
    """Files hold DoRA and rotations (OFT, BOFT) at strength 1 only: no parameter change gives t · (W' − W)."""
    return bool(case.options.get("use_dora")) or case.algorithm in ("oft", "boft")


def _scales_bias(case: Case) -> bool:
    """(IA)³ with PEFT's meaning (``scale_bias``, the default) on the output side of a layer with a bias:
    ``(W x + b) ⊙ (1 + v)``, which a LyCORIS (IA)³ file cannot say (the UIs and LyCORIS leave the bias)."""
    output_side = case.algorithm == "ia3" and "feedforward_modules" not in case.options
    return output_side and case.options.get("scale_bias", True) and LAYERS[case.layer][0]().bias is not None


def _grouped_input_ia3(case: Case) -> bool:
    """(IA)³ on a grouped convolution's input channels: the vector has an entry per input channel of the layer,
    which LyCORIS' formula cannot multiply into the per-group weight."""
    return case.algorithm == "ia3" and "feedforward_modules" in case.options and case.layer == "conv2d_grouped"


CASES = [
    c
    for c in all_cases()
    if not (_unscalable(c) and c.multiplier != 1.0) and not _scales_bias(c) and not _grouped_input_ia3(c)
]
BIAS_SCALING = [c for c in all_cases() if _scales_bias(c)]
UNSCALABLE_WITH_MULTIPLIER = [c for c in all_cases() if _unscalable(c) and c.multiplier != 1.0]
EXTRA = [
    Case("lora", "linear", {"r": 4, "alpha": 6.0, "use_rslora": True}, multiplier=0.6),
    Case("lokr", "linear", {"r": 16, "alpha": 3.0}, multiplier=1.7),  # both factors full, alpha ≠ r
    Case("lokr", "conv2d", {"r": 16, "alpha": 3.0}),
    Case("loha", "conv2d", {"r": 3, "alpha": 1.5, "use_effective_conv2d": True}, multiplier=0.3),
    Case("lora", "linear", {"r": 4, "use_dora": True, "dora_on_output": False}),
]


def _wrapped(case: Case, dtype=torch.float64):
    model, x = build(case, dtype)
    base = copy.deepcopy(model).eval()
    peft = bl.get_peft_model(model, case.config()).eval()
    randomize(peft)
    peft.set_multiplier(case.multiplier)
    return peft, base, x


def ui_reference(base: torch.nn.Module, path) -> torch.nn.Module:
    """A float64 copy of ``base`` with what a UI adds from the file (module key ``lycoris_layer``)."""
    tensors = load_file(str(path))
    params = {k.partition(".")[2]: v for k, v in tensors.items() if k.startswith("lycoris_layer.")}
    assert params and len(params) == len(tensors)
    module = copy.deepcopy(base.layer).double()
    transposed = type(module).__name__ in ("Conv1D", "Embedding")
    with torch.no_grad():
        weight = module.weight.t() if transposed else module.weight
        delta, bias = ui_delta(params, weight.clone())
        weight += delta
        if bias is not None:
            module.bias += bias.double()
    return module


@pytest.mark.parametrize("case", CASES + EXTRA, ids=[c.id for c in CASES + EXTRA])
def test_ui_formula_reproduces_our_forward_and_reload_is_exact(case: Case, tmp_path) -> None:
    peft, base, x = _wrapped(case)
    expected = peft(x)
    path = tmp_path / "adapter.safetensors"
    peft.save_pretrained(path)
    torch.testing.assert_close(ui_reference(base, path)(x), expected, rtol=1e-10, atol=1e-10)
    reloaded = bl.PeftModel.from_pretrained(copy.deepcopy(base), path)
    torch.testing.assert_close(reloaded(x), expected, rtol=1e-10, atol=1e-10)
    reloaded.save_pretrained(tmp_path / "again.safetensors")
    first, second = load_file(str(path)), load_file(str(tmp_path / "again.safetensors"))
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(second[key], first[key], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", BIAS_SCALING, ids=[c.id for c in BIAS_SCALING])
def test_ia3_scaling_the_bias_is_recorded_in_the_metadata(case: Case, tmp_path) -> None:
    """The file states its meaning: our reload is exact; without our metadata (as LyCORIS and the UIs read it)
    the same tensors mean ``W x ⊙ (1 + v) + b``.  Saving warns that the UIs differ, and strict refuses."""
    peft, base, x = _wrapped(case)
    expected = peft(x)
    path = tmp_path / "adapter.safetensors"
    with pytest.raises(FormatError, match="scale_bias=True"):
        peft.save_pretrained(path, strict=True)
    with pytest.warns(UserWarning, match="LyCORIS leaves the bias unchanged"):
        peft.save_pretrained(path)
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["beyondlora_modules"])["lycoris_layer"]["scale_bias"] is True
    torch.testing.assert_close(bl.PeftModel.from_pretrained(copy.deepcopy(base), path)(x), expected)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(path)), str(bare))  # no metadata: LyCORIS' meaning
    as_lycoris = bl.PeftModel.from_pretrained(copy.deepcopy(base), bare)(x)
    torch.testing.assert_close(as_lycoris, ui_reference(base, path)(x), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(as_lycoris, expected, atol=1e-6)


def test_ia3_on_grouped_input_channels_warns_and_reloads_exactly(tmp_path) -> None:
    (case,) = [c for c in all_cases() if _grouped_input_ia3(c)]
    peft, base, x = _wrapped(case)
    path = tmp_path / "adapter.safetensors"
    with pytest.warns(UserWarning, match="input-side \\(IA\\)³ on a grouped convolution"):
        peft.save_pretrained(path)
    assert load_file(str(path))["lycoris_layer.weight"].shape == (1, 4, 1, 1)  # the layer's 4 input channels
    torch.testing.assert_close(bl.PeftModel.from_pretrained(copy.deepcopy(base), path)(x), peft(x))


@pytest.mark.parametrize("case", UNSCALABLE_WITH_MULTIPLIER, ids=[c.id for c in UNSCALABLE_WITH_MULTIPLIER])
def test_strength_bound_adapter_with_multiplier_is_refused(case: Case, tmp_path) -> None:
    peft, _, _ = _wrapped(case)
    with pytest.raises(FormatError, match="adapter with multiplier ≠ 1 cannot be written exactly"):
        peft.save_pretrained(tmp_path / "adapter.safetensors")
    assert not list(tmp_path.iterdir())


def test_metadata_and_dtype(tmp_path) -> None:
    case = Case("dylora", "linear", {"r": 4, "block_size": 2, "rank_dropout": 0.1})
    peft, base, x = _wrapped(case, torch.float32)
    path = tmp_path / "adapter.safetensors"
    peft.save_pretrained(path, prefix="lycoris", dtype=torch.float16)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        assert handle.get_tensor("lycoris_layer.lora_down.weight").dtype == torch.float16
        assert handle.get_tensor("lycoris_layer.alpha").dtype == torch.float32
    modules = json.loads(metadata["beyondlora_modules"])
    assert modules["lycoris_layer"]["algorithm"] == "dylora" and modules["lycoris_layer"]["block_size"] == 2
    assert metadata["ss_network_module"] == "lycoris.kohya" and metadata["ss_network_dim"] == "4"
    assert json.loads(metadata["ss_network_args"])["algo"] == "dylora"
    assert metadata["beyondlora_version"] == bl.__version__
    reloaded = bl.PeftModel.from_pretrained(copy.deepcopy(base), path)
    adapter = reloaded.base_model.layer.adapters["default"]
    assert adapter.algorithm == "dylora" and adapter.options.rank_dropout == 0.1
    torch.testing.assert_close(reloaded(x), peft(x), rtol=2e-3, atol=2e-3)


def test_file_without_metadata_and_other_prefix(tmp_path) -> None:
    peft, base, x = _wrapped(Case("lokr", "conv2d", {"r": 1, "use_effective_conv2d": True, "decompose_factor": 2}))
    path = tmp_path / "adapter.safetensors"
    peft.save_pretrained(path, prefix="lora_unet")
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(path)), str(bare))  # no metadata at all
    reloaded = bl.PeftModel.from_pretrained(copy.deepcopy(base), bare)
    torch.testing.assert_close(reloaded(x), peft(x), rtol=1e-10, atol=1e-10)


def test_mixed_algorithms_in_one_file(tmp_path) -> None:
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 12), torch.nn.GELU(), torch.nn.Linear(12, 6), torch.nn.LayerNorm(6)
    ).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    tensors = {
        "lycoris_0.lokr_w1": torch.randn(2, 2),
        "lycoris_0.lokr_w2": torch.randn(6, 4),
        "lycoris_0.alpha": torch.tensor(7.0),
        "lycoris_2.hada_w1_a": torch.randn(6, 2),
        "lycoris_2.hada_w1_b": torch.randn(2, 12),
        "lycoris_2.hada_w2_a": torch.randn(6, 2),
        "lycoris_2.hada_w2_b": torch.randn(2, 12),
        "lycoris_2.alpha": torch.tensor(1.0),
        "lycoris_3.w_norm": torch.randn(6),
        "lycoris_3.b_norm": torch.randn(6),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for index in ("0", "2", "3"):
            params = {k.partition(".")[2]: v for k, v in tensors.items() if k.startswith(f"lycoris_{index}.")}
            module = reference[int(index)]
            delta, bias = ui_delta(params, module.weight.detach().clone())
            module.weight += delta
            if bias is not None:
                module.bias += bias.double()
    loaded = bl.PeftModel.from_pretrained(model, path)
    torch.testing.assert_close(loaded(x), reference(x))
    algorithms = {type(m.adapters["default"]).__name__ for m in loaded.modules() if isinstance(m, bl.AdapterLayer)}
    assert algorithms == {"LoKr", "LoHa", "Norm"}
    with pytest.raises(ValueError, match="mixes algorithms .* save to a .safetensors file"):
        loaded.save_pretrained(tmp_path / "folder")


def _damaged(tmp_path, change):
    peft, base, _ = _wrapped(Case("lora", "conv2d", {"r": 4}))
    path = tmp_path / "adapter.safetensors"
    peft.save_pretrained(path)
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    return base, path


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t.update({"lycoris_layer.lora_up.weight": torch.zeros(9, 4, 1, 1)}),
            r"lora_up.weight has shape \(9, 4, 1, 1\)",
        ),
        (lambda t: t["lycoris_layer.lora_down.weight"].fill_(float("inf")), "contains NaN or infinite"),
        (lambda t: t.update({"lycoris_other_block.lora_down.weight": torch.zeros(2, 2)}), "match no module"),
        (lambda t: t.pop("lycoris_layer.lora_up.weight"), "missing tensor"),
        (
            lambda t: [t.pop(k) for k in list(t)] and t.update({"lycoris_layer.mystery": torch.zeros(1)}),
            "no known adapter",
        ),
    ],
)
def test_bad_single_file_raises_and_leaves_model_untouched(tmp_path, change, message) -> None:
    base, path = _damaged(tmp_path, change)
    target = copy.deepcopy(base)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        bl.PeftModel.from_pretrained(target, path)
    assert str(path) in str(pytest.raises(ValueError, bl.PeftModel.from_pretrained, copy.deepcopy(base), path).value)
    assert not any(isinstance(m, bl.AdapterLayer) for m in target.modules())
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


@pytest.mark.parametrize(
    "content, message", [(b"", "is empty"), (b"not safetensors at all", "not a readable safetensors")]
)
def test_unreadable_single_file(tmp_path, content, message) -> None:
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        bl.PeftModel.from_pretrained(torch.nn.Linear(2, 2), path)
    with pytest.raises(FileNotFoundError, match="not found"):
        bl.PeftModel.from_pretrained(torch.nn.Linear(2, 2), tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "case",
    [
        Case("lokr", "linear", {"r": 2, "alpha": 3.0}, multiplier=0.5),
        Case("lora", "conv2d_1x1", {"r": 4, "use_dora": True}),
    ],
    ids=["lokr", "lora-dora"],
)
def test_convert_between_formats(case: Case, tmp_path) -> None:
    peft, base, x = _wrapped(case)
    expected = peft(x)
    peft.save_pretrained(tmp_path / "folder")
    target = copy.deepcopy(base)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    bl.convert_adapter(target, tmp_path / "folder", tmp_path / "adapter.safetensors")
    bl.convert_adapter(target, tmp_path / "adapter.safetensors", tmp_path / "again")
    assert type(target.layer) is type(base.layer) and all(p.requires_grad for p in target.parameters())
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    for source in ("adapter.safetensors", "again"):
        loaded = bl.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / source)
        torch.testing.assert_close(loaded(x), expected, rtol=1e-10, atol=1e-10)


def test_truncated_single_file(tmp_path) -> None:
    peft, base, _ = _wrapped(Case("lokr", "linear", {"r": 2}))
    path = tmp_path / "adapter.safetensors"
    peft.save_pretrained(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    target = copy.deepcopy(base)
    with pytest.raises(ValueError, match=f"{path.name} is not a readable safetensors file"):
        bl.PeftModel.from_pretrained(target, path)
    assert not any(isinstance(m, bl.AdapterLayer) for m in target.modules())


def test_unknown_tensors_in_a_module_are_an_error(tmp_path) -> None:
    """A model file (``x.weight`` + ``x.bias``) must not pass for an (IA)³ adapter, nor stray tensors be ignored."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 6))
    path = tmp_path / "not_an_adapter.safetensors"
    save_file({"lycoris_0.weight": torch.randn(6, 4), "lycoris_0.bias": torch.randn(6)}, str(path))
    with pytest.raises(ValueError, match=r"\['bias'\] are not part of a ia3 adapter"):
        bl.PeftModel.from_pretrained(model, path)
    save_file({"lycoris_0.diff": torch.randn(6, 4), "lycoris_0.extra": torch.zeros(1)}, str(path))
    with pytest.raises(ValueError, match=r"\['extra'\] are not part of a full adapter"):
        bl.PeftModel.from_pretrained(model, path)
    assert type(model[0]) is torch.nn.Linear
