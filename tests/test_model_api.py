"""The wrapper: several adapters, activation, training randomness, low-memory init, bad adapter folders."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import beyondlora as bl
from beyondlora.integrations.scalar import add_scalar
from beyondlora.ops.products import hadamard_delta
from helpers.layer_cases import Case, build, layers_of, randomize, set_mode
from helpers.reference import reference_module


def _two_adapters():
    model, x = build(Case("lokr", "conv2d_1x1"))  # a layer PEFT's folder format can express
    base = copy.deepcopy(model).eval()
    peft = bl.get_peft_model(model, bl.LoKrConfig(r=2, target_modules=["layer"])).eval()
    peft.add_adapter("second", bl.LoHaConfig(r=2, alpha=1, target_modules=["layer"]))
    randomize(peft)
    return peft, base, x


def test_added_adapter_is_inactive_until_set() -> None:
    peft, base, x = _two_adapters()
    layer = layers_of(peft)[0]
    first, second = layer.adapters["default"], layer.adapters["second"]
    torch.testing.assert_close(peft(x), reference_module(base.layer, [first])(x))
    assert not any(p.requires_grad for p in second.parameters())
    peft.set_adapter("second")
    torch.testing.assert_close(peft(x), reference_module(base.layer, [second])(x))
    assert all(p.requires_grad for p in second.parameters()) and not any(p.requires_grad for p in first.parameters())


def test_several_active_adapters_sum_with_their_multipliers() -> None:
    peft, base, x = _two_adapters()
    peft.set_adapter(["default", "second"])
    peft.set_multiplier(0.5, "second")
    adapters = list(layers_of(peft)[0].adapters.values())
    expected = reference_module(base.layer, adapters)(x)
    for mode in ("bypass", "combined"):
        set_mode(peft, mode)
        torch.testing.assert_close(peft(x), expected)
    peft.merge_adapter()
    torch.testing.assert_close(peft(x), expected)
    with pytest.raises(ValueError, match="merged"):
        peft.set_multiplier(1.0)
    peft.unmerge_adapter()
    torch.testing.assert_close(layers_of(peft)[0].base_layer.weight, base.layer.weight, rtol=1e-12, atol=1e-12)


def test_the_remembered_path_choice_follows_settings_merges_and_adapters() -> None:
    """The layer remembers the cost model's choice per input size; every setting it depends on is part of
    what it remembers by, and adding or deleting an adapter forgets it."""
    torch.manual_seed(0)
    peft = bl.get_peft_model(nn.Sequential(nn.Linear(64, 64)), bl.LoraConfig(r=4, target_modules=["0"]))
    layer = layers_of(peft)[0]
    few, many = torch.randn(1, 64), torch.randn(1000, 64)  # LoRA r=4 on 64×64: the bypass wins below 32 rows
    with torch.no_grad():
        assert layer._path(few, ["default"]) == "bypass" and layer._path(many, ["default"]) != "bypass"
        layer.forward_mode = "bypass"
        assert layer._path(many, ["default"]) == "bypass"
        layer.forward_mode = "combined"
        assert layer._path(few, ["default"]) != "bypass"
        layer.forward_mode = "auto"
        assert layer._path(few, ["default"]) == "bypass"
    # (IA)³ reads the base output W·x: no bypass while another adapter is merged into W
    peft.add_adapter("scale", bl.IA3Config(target_modules=["0"]))
    assert layer._path(few, ["scale"]) == "bypass"
    peft.merge_adapter(["default"])
    assert layer._path(few, ["scale"]) != "bypass"
    peft.unmerge_adapter()
    assert layer._path(few, ["scale"]) == "bypass"
    # the same name, another kind of adapter: at 20 rows LoRA's bypass costs less, a full ΔW's more
    rows = torch.randn(20, 64)
    with torch.no_grad():
        assert layer._path(rows, ["default"]) == "bypass"
    peft.delete_adapter("default")
    peft.add_adapter("default", bl.FullConfig(target_modules=["0"]))
    with torch.no_grad():
        assert layer._path(rows, ["default"]) != "bypass"


def test_delete_adapter() -> None:
    peft, base, x = _two_adapters()
    peft.delete_adapter("default")
    assert peft.active_adapters == ["second"]
    torch.testing.assert_close(peft(x), reference_module(base.layer, [layers_of(peft)[0].adapters["second"]])(x))
    with pytest.raises(ValueError, match="unknown adapter"):
        peft.delete_adapter("default")


def test_non_default_adapter_saves_in_subfolder_and_loads(tmp_path) -> None:
    peft, base, x = _two_adapters()
    peft.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file() and (
        tmp_path / "second" / "adapter_config.json"
    ).is_file()
    loaded = bl.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    loaded.load_adapter(tmp_path / "second", "second")
    loaded.set_adapter(["default", "second"])
    peft.set_adapter(["default", "second"])
    torch.testing.assert_close(loaded(x), peft(x))


def test_trainable_from_pretrained(tmp_path) -> None:
    peft, base, _ = _two_adapters()
    peft.save_pretrained(tmp_path)
    loaded = bl.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    trainable = [n for n, p in loaded.named_parameters() if p.requires_grad]
    assert trainable and all(".adapters.default." in n for n in trainable)


def test_low_cpu_mem_usage_keeps_adapters_on_meta_until_loaded(tmp_path) -> None:
    peft, base, x = _two_adapters()
    peft.save_pretrained(tmp_path)
    lazy = bl.get_peft_model(copy.deepcopy(base), bl.LoKrConfig(r=2, target_modules=["layer"]), low_cpu_mem_usage=True)
    assert all(p.is_meta for p in layers_of(lazy)[0].adapters["default"].parameters())
    loaded = bl.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in loaded.parameters())
    torch.testing.assert_close(loaded(x), peft(x))


@pytest.mark.parametrize(
    "config",
    [
        bl.LoraConfig(r=4, rank_dropout=0.5, rank_dropout_scale=True, target_modules=["layer"]),
        bl.LoHaConfig(r=4, rank_dropout=0.5, target_modules=["layer"]),
        bl.LoKrConfig(r=2, rank_dropout=0.5, decompose_both=True, decompose_factor=2, target_modules=["layer"]),
        bl.LoKrConfig(r=16, rank_dropout=0.5, target_modules=["layer"]),
        bl.DyLoraConfig(r=4, block_size=1, target_modules=["layer"]),
    ],
)
def test_training_randomness_is_shared_by_both_paths(config) -> None:
    model, x = build(Case("lora", "conv2d"))
    peft = bl.get_peft_model(model, config)
    randomize(peft)
    peft.train()
    outputs = {}
    for mode in ("bypass", "combined"):
        set_mode(peft, mode)
        torch.manual_seed(123)
        outputs[mode] = [peft(x) for _ in range(4)]
    for bypass, combined in zip(outputs["bypass"], outputs["combined"], strict=True):
        torch.testing.assert_close(bypass, combined)
    assert not all(torch.allclose(outputs["bypass"][0], o) for o in outputs["bypass"][1:]), "training must be random"
    peft.eval()
    torch.testing.assert_close(peft(x), peft(x))


def test_module_dropout_skips_the_adapter_sometimes() -> None:
    model, x = build(Case("lora", "linear"))
    base = copy.deepcopy(model)
    peft = bl.get_peft_model(model, bl.LoraConfig(r=4, module_dropout=0.5, target_modules=["layer"]))
    randomize(peft)
    peft.train()
    torch.manual_seed(0)
    skipped = [torch.equal(peft(x), base(x)) for _ in range(40)]
    assert 5 < sum(skipped) < 35
    peft.eval()
    assert not torch.equal(peft(x), base(x))


def test_dylora_truncation() -> None:
    model, x = build(Case("dylora", "linear"))
    peft = bl.get_peft_model(model, bl.DyLoraConfig(r=4, alpha=2, block_size=2, target_modules=["layer"]))
    randomize(peft)
    adapter = layers_of(peft)[0].adapters["default"]
    up, down, scale = adapter.truncated_factors(2)
    torch.testing.assert_close(up, adapter.lora_up[:, :2]) and torch.testing.assert_close(down, adapter.lora_down[:2])
    assert scale == 1.0
    with pytest.raises(ValueError, match="rank must be"):
        adapter.truncated_factors(5)


@pytest.mark.parametrize("rslora", [False, True])
def test_dylora_block_scale_is_the_scale_at_its_rank_and_carries_a_trainable_scalar(rslora: bool) -> None:
    """A block up to rank k trains with alpha / k (rs-LoRA alpha / √k), the eval scale at k = r; kohya's
    use_scalar multiplies it too (scalar 0: the identity in training as in eval, and the scalar learns)."""
    model, x = build(Case("dylora", "linear"))
    peft = bl.get_peft_model(
        model, bl.DyLoraConfig(r=4, alpha=2, block_size=2, use_rslora=rslora, target_modules=["layer"])
    )
    randomize(peft)
    host = layers_of(peft)[0]
    adapter = host.adapters["default"]
    for block, k in ((0, 2), (1, 4)):
        assert (
            adapter.factors(block)[3] == adapter.truncated_factors(k)[2] == pytest.approx(2 / (k**0.5 if rslora else k))
        )
    add_scalar(adapter)
    peft.train()
    out = peft(x)
    torch.testing.assert_close(out, host.base_layer(x), rtol=0, atol=0)
    out.square().sum().backward()
    assert adapter.scalar.grad is not None and adapter.scalar.grad.abs() > 0


@pytest.mark.parametrize("kind", ["linear", "conv2d", "embedding"])
def test_stacked_adapters_in_different_dtypes_run_the_combined_path(kind: str) -> None:
    """W + ΔW for a stack whose adapters were cast apart promotes like the sum of their deltas."""
    model, x = build(Case("lora", kind))
    peft = bl.get_peft_model(model, bl.LoraConfig(r=4, target_modules=["layer"], init_weights=False), adapter_name="a")
    peft.add_adapter("b", bl.LoraConfig(r=4, target_modules=["layer"], init_weights=False))
    peft.set_adapter(["a", "b"])
    host = layers_of(peft)[0]
    host.adapters["a"].double()
    host.adapters["b"].float()
    outputs = []
    for mode in ("bypass", "combined"):
        host.forward_mode = mode
        with torch.no_grad():
            outputs.append(peft(x).double())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def test_hadamard_product_gradcheck() -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(s, dtype=torch.float64, generator=generator, requires_grad=True)
        for s in [(5, 3), (3, 7), (5, 3), (3, 7)]
    ]
    assert torch.autograd.gradcheck(lambda *t: hadamard_delta(*t), tensors)
    assert torch.autograd.gradgradcheck(lambda *t: hadamard_delta(*t), tensors) is not None


# --- bad adapter folders -------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    model, x = build(Case("loha", "linear"))
    base = copy.deepcopy(model)
    peft = bl.get_peft_model(model, bl.LoHaConfig(r=4, target_modules=["layer"]))
    randomize(peft)
    peft.save_pretrained(tmp_path)
    return base, tmp_path


def _corrupt(folder, change):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "adapter_model.safetensors").write_bytes(b""), "is empty"),
        (
            lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 10),
            "not a readable safetensors file",
        ),
        (lambda f: (f / "adapter_model.safetensors").unlink(), "adapter file not found"),
        (lambda f: (f / "adapter_config.json").unlink(), "no adapter_config.json"),
        (lambda f: (f / "adapter_config.json").write_text("{oops"), "not valid JSON"),
        (
            lambda f: _corrupt(f, lambda t: t.update({"base_model.model.layer.hada_w1_a": torch.zeros(3, 3)})),
            r"adapter_model.safetensors: module 'layer': hada_w1_a has shape \(3, 3\), expected \(20, 4\)",
        ),
        (
            lambda f: _corrupt(f, lambda t: t["base_model.model.layer.hada_w2_b"].__setitem__((0, 0), float("nan"))),
            "hada_w2_b' contains NaN",
        ),
        (
            lambda f: _corrupt(f, lambda t: t.pop("base_model.model.layer.hada_w1_b")),
            "module 'layer': missing tensor 'hada_w1_b'",
        ),
        (
            lambda f: _corrupt(f, lambda t: t.update({"base_model.model.other.lora_up": torch.zeros(2)})),
            "match no adapted module",
        ),
        (
            lambda f: (f / "adapter_config.json").write_text(
                json.dumps({"peft_type": "LOHA", "r": 4, "target_modules": ["missing"]})
            ),
            "matched no module",
        ),
    ],
)
def test_bad_folder_raises_and_leaves_model_untouched(saved, damage, message) -> None:
    base, folder = saved
    damage(folder)
    target = copy.deepcopy(base)
    state = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        bl.PeftModel.from_pretrained(target, folder)
    assert not any(isinstance(m, bl.AdapterLayer) for m in target.modules())
    assert all(torch.equal(v, state[k]) for k, v in target.state_dict().items())
    assert all(p.requires_grad for p in target.parameters())


def test_missing_folder() -> None:
    with pytest.raises(FileNotFoundError, match="adapter path not found"):
        bl.PeftModel.from_pretrained(nn.Linear(2, 2), "/nonexistent/adapter")


def test_saving_is_atomic(tmp_path, monkeypatch) -> None:
    peft = bl.get_peft_model(build(Case("lora", "linear"))[0], bl.LoraConfig(r=2, target_modules=["layer"]))
    peft.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize(peft)

    def exploding_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("beyondlora.formats.tensors.save_file", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        peft.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


class _Exploit:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_legacy_bin_folder_loads_with_weights_only(saved, capsys) -> None:
    base, folder = saved
    model_file = folder / "adapter_model.safetensors"
    torch.save(load_file(str(model_file)), folder / "adapter_model.bin")
    expected = bl.PeftModel.from_pretrained(copy.deepcopy(base), folder)
    model_file.unlink()
    x = torch.randn(2, 12, dtype=torch.float64)
    torch.testing.assert_close(bl.PeftModel.from_pretrained(copy.deepcopy(base), folder)(x), expected(x))
    torch.save({"base_model.model.layer.hada_w1_a": _Exploit()}, folder / "adapter_model.bin")
    target = copy.deepcopy(base)
    with pytest.raises(ValueError, match="adapter_model.bin cannot be read safely"):
        bl.PeftModel.from_pretrained(target, folder)
    assert "unpickled arbitrary code" not in capsys.readouterr().out
    assert not any(isinstance(m, bl.AdapterLayer) for m in target.modules())
