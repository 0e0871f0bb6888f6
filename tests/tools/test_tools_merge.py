"""``beyondlora merge``: every algorithm and format baked into the base equals W + t · ΔW computed by the
independent UI formula (tests/helpers/ui_formula.py) from the adapter file; every other tensor is untouched."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import beyondlora as bl
from beyondlora.cli import main
from beyondlora.formats.saved_modules import SAVED_KEY
from beyondlora.formats.single_file import group_by_module
from helpers.tool_cases import (
    files_in,
    low_rank,
    planted_model,
    save_pipeline,
    save_state,
    state_of,
    tiny_text_encoder,
    tiny_unet,
)
from helpers.ui_formula import ui_delta

CONFIGS = {
    # alpha ≠ r everywhere: LyCORIS' own merge applies the LoHa / LoKr scale twice there
    "lora": lambda: bl.LoraConfig(r=4, alpha=8, target_modules=["lin", "conv", "token_embedding"], init_weights=False),
    "loha": lambda: bl.LoHaConfig(r=4, alpha=2, target_modules=["lin", "conv", "proj"], init_weights=False),
    "lokr": lambda: bl.LoKrConfig(r=2, alpha=6, decompose_factor=4, target_modules=["lin", "conv"], init_weights=False),
    # LyCORIS' meaning, the consumers' formula (PEFT's, which scales the bias, below)
    "ia3": lambda: bl.IA3Config(
        target_modules=["lin", "pw"], feedforward_modules=["pw"], init_weights=False, scale_bias=False
    ),
    "full": lambda: bl.FullConfig(target_modules=["lin", "conv"], init_weights=False),
    "glora": lambda: bl.GLoRAConfig(
        r=3, alpha=2, target_modules=["lin", "conv", "pw", "token_embedding"], init_weights=False
    ),
    "norm": lambda: bl.NormConfig(target_modules=["norm"], init_weights=False),
    "dora": lambda: bl.LoraConfig(r=4, alpha=4, target_modules=["lin", "proj"], use_dora=True, init_weights=False),
    "oft": lambda: bl.OFTConfig(
        r=4, constraint=0.01, rescaled=True, target_modules=["lin", "conv", "token_embedding"], init_weights=False
    ),
    "boft": lambda: bl.BOFTConfig(r=4, rescaled=True, target_modules=["lin", "conv"], init_weights=False),
}


def _canonical(key: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t() if key.startswith("token_embedding") else tensor


def _save_adapter(algorithm: str, path, seed: int = 1) -> None:
    torch.manual_seed(seed)
    model = bl.get_peft_model(planted_model(), CONFIGS[algorithm]())
    model.save_pretrained(str(path))


def _expected(base: dict, adapters: list[tuple[str, float]], prefix: str = "lycoris") -> dict:
    """W + Σ t · ΔW(file) and b + Σ t · Δb(file), every ΔW on the unmerged W, in float64."""
    expected = {k: v.double() if v.is_floating_point() else v for k, v in base.items()}
    for path, t in adapters:
        for key, params in group_by_module(load_file(path)).items():
            if key == SAVED_KEY:  # whole modules saved beside the adapter: the callers set those
                continue
            name = key[len(prefix) + 1 :].replace("block_proj", "block.proj")
            weight = _canonical(name, base[f"{name}.weight"].double())
            delta, bias = ui_delta(params, weight)
            expected[f"{name}.weight"] = expected[f"{name}.weight"] + t * _canonical(name, delta)
            if bias is not None:
                expected[f"{name}.bias"] = expected[f"{name}.bias"] + t * bias
    return expected


def _assert_merged(merged: dict, expected: dict, base: dict, touched: set[str], rtol: float = 2e-6) -> None:
    assert set(merged) == set(base)
    for key, value in merged.items():
        if key in touched:
            scale = float(expected[key].abs().max())
            torch.testing.assert_close(value.double(), expected[key], rtol=rtol, atol=rtol * scale, msg=key)
        else:
            assert torch.equal(value, base[key]) and value.dtype == base[key].dtype, key


def _touched(paths, prefix: str = "lycoris") -> set[str]:
    out = set()
    for path in paths:
        for key, params in group_by_module(load_file(path)).items():
            if key == SAVED_KEY:
                continue
            name = key[len(prefix) + 1 :].replace("block_proj", "block.proj")
            out.add(f"{name}.weight")
            if "diff_b" in params or "b_norm" in params:
                out.add(f"{name}.bias")
    return out


@pytest.mark.parametrize("algorithm", sorted(CONFIGS))
def test_each_algorithm_merges_to_the_consumer_formula(tmp_path, algorithm) -> None:
    base = state_of(planted_model())
    save_state(base, tmp_path / "base.safetensors", metadata={"origin": "test"})
    adapter = tmp_path / f"{algorithm}.safetensors"
    _save_adapter(algorithm, adapter)
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(tmp_path / "base.safetensors"), str(adapter), "--out", str(out)]) == 0
    merged = load_file(out)
    _assert_merged(merged, _expected(base, [(adapter, 1.0)]), base, _touched([adapter]))
    with safe_open(str(out), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["origin"] == "test" and json.loads(metadata["beyondlora_merged"])[0]["multiplier"] == 1.0


def test_ia3_scaling_the_bias_merges_it(tmp_path) -> None:
    """(IA)³ with PEFT's meaning, from our single file (its metadata says so) and from a PEFT folder: the merged
    checkpoint equals the model's own merge, the output-scaled layer's bias scaled too."""
    base = state_of(planted_model())
    save_state(base, tmp_path / "base.safetensors")
    torch.manual_seed(1)
    config = bl.IA3Config(target_modules=["lin", "pw"], feedforward_modules=["pw"], init_weights=False)
    model = bl.get_peft_model(planted_model(), config)
    with pytest.warns(UserWarning, match="scale_bias=True"):
        model.save_pretrained(tmp_path / "ia3.safetensors")
    model.save_pretrained(tmp_path / "ia3-folder")
    expected = model.merge_and_unload().state_dict()
    assert not torch.allclose(expected["lin.bias"], base["lin.bias"])
    for source in ("ia3.safetensors", "ia3-folder"):
        out = tmp_path / f"merged-{source}.safetensors"
        assert main(["merge", str(tmp_path / "base.safetensors"), str(tmp_path / source), "--out", str(out)]) == 0
        merged = load_file(out)
        for key, value in expected.items():
            torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-6, msg=f"{source}: {key}")


def test_several_adapters_with_multipliers_and_dtype(tmp_path, capsys) -> None:
    base = state_of(planted_model())
    save_state(base, tmp_path / "base.safetensors")
    paths = [tmp_path / "lora.safetensors", tmp_path / "lokr.safetensors", tmp_path / "dora.safetensors"]
    for path, algorithm in zip(paths, ["lora", "lokr", "dora"], strict=True):
        _save_adapter(algorithm, path)
    multipliers = [0.5, -1.0, 0.7]
    out = tmp_path / "merged.safetensors"
    args = ["merge", str(tmp_path / "base.safetensors"), *map(str, paths), "--out", str(out)]
    assert main(args + ["--multiplier", *map(str, multipliers)]) == 0
    expected = _expected(base, list(zip(paths, multipliers, strict=True)))
    _assert_merged(load_file(out), expected, base, _touched(paths))
    out_text = capsys.readouterr().out
    assert "merged 4 module(s)" in out_text and "lin              3 adapter(s)" in out_text
    half = tmp_path / "half.safetensors"
    assert main(args + ["--multiplier", *map(str, multipliers), "--out", str(half), "--dtype", "fp16"]) == 0
    merged = load_file(half)
    for key, value in merged.items():
        if base[key].is_floating_point():
            assert value.dtype == torch.float16
            torch.testing.assert_close(value, expected[key].half(), rtol=1e-3, atol=1e-3, msg=key)
        else:
            assert torch.equal(value, base[key])


def test_peft_folder_with_modules_to_save(tmp_path) -> None:
    base = state_of(planted_model())
    save_state(base, tmp_path / "base.safetensors")
    torch.manual_seed(2)
    config = bl.LoraConfig(r=4, alpha=4, target_modules=["lin", "conv"], modules_to_save=["proj"], init_weights=False)
    model = bl.get_peft_model(planted_model(), config)
    with torch.no_grad():
        model.base_model.block.proj.modules_to_save["default"].weight.add_(0.25)
    model.save_pretrained(str(tmp_path / "folder"))
    as_file = tmp_path / "same.safetensors"
    model.save_pretrained(str(as_file))  # the same adapter as a single file: the reference ΔW
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(tmp_path / "base.safetensors"), str(tmp_path / "folder"), "--out", str(out)]) == 0
    merged = load_file(out)
    expected = _expected(base, [(as_file, 1.0)])
    expected["block.proj.weight"] = base["block.proj.weight"].double() + 0.25
    _assert_merged(merged, expected, base, _touched([as_file]) | {"block.proj.weight"})
    from_file = tmp_path / "merged_from_file.safetensors"  # the single file carries the saved module too
    assert main(["merge", str(tmp_path / "base.safetensors"), str(as_file), "--out", str(from_file)]) == 0
    for key, tensor in load_file(from_file).items():
        torch.testing.assert_close(tensor, merged[key], msg=key)


def test_extract_then_merge_reproduces_a_tuned_pipeline_folder(tmp_path) -> None:
    base_unet, tuned_unet = tiny_unet(), tiny_unet()
    text_encoder, tuned_text_encoder = tiny_text_encoder(), tiny_text_encoder()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in (tuned_unet.conv_in, tuned_unet.up_blocks[1].attentions[0].proj_out):
            shape = layer.weight.shape
            layer.weight += low_rank(shape[0], layer.weight[0].numel(), 2, g, 0.1).reshape(shape)
        encoder = getattr(tuned_text_encoder, "text_model", tuned_text_encoder).encoder
        encoder.layers[0].self_attn.v_proj.weight += low_rank(32, 32, 2, g, 0.1)
    save_pipeline(base_unet, text_encoder, tmp_path / "base")
    save_pipeline(tuned_unet, tuned_text_encoder, tmp_path / "tuned")
    adapter = tmp_path / "a.safetensors"
    assert main(["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), str(adapter), "--linear-dim", "2"]) == 0
    out = tmp_path / "merged"
    assert main(["merge", str(tmp_path / "base"), str(adapter), "--out", str(out)]) == 0
    assert files_in(out) == files_in(tmp_path / "base")  # configs, tokenizer and model_index copied
    for part, weights in (("unet", "diffusion_pytorch_model.safetensors"), ("text_encoder", "model.safetensors")):
        merged, tuned = load_file(out / part / weights), load_file(tmp_path / "tuned" / part / weights)
        base = load_file(tmp_path / "base" / part / weights)
        assert set(merged) == set(tuned)
        for key in merged:
            if torch.equal(tuned[key], base[key]):
                assert torch.equal(merged[key], base[key]), key
            else:
                torch.testing.assert_close(merged[key], tuned[key], rtol=1e-5, atol=1e-5, msg=key)
    assert (out / "unet" / "config.json").read_text() == (tmp_path / "base" / "unet" / "config.json").read_text()


def test_sharded_folder_keeps_its_shards_and_index(tmp_path) -> None:
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "base", safe_serialization=True, max_shard_size="200KB")
    shards = sorted(p.name for p in (tmp_path / "base").glob("*.safetensors"))
    assert len(shards) > 1
    torch.manual_seed(4)
    config = bl.LoraConfig(r=2, alpha=2, target_modules=["to_q", "conv1", "proj_in"], init_weights=False)
    wrapped = bl.get_peft_model(tiny_unet(), config)
    wrapped.save_pretrained(str(tmp_path / "a.safetensors"), prefix="lora_unet")
    out = tmp_path / "merged"
    assert (
        main(["merge", str(tmp_path / "base"), str(tmp_path / "a.safetensors"), "--out", str(out), "--dtype", "fp16"])
        == 0
    )
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    original = json.loads((tmp_path / "base" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert index["weight_map"] == original["weight_map"]
    merged = {k: v for shard in shards for k, v in load_file(out / shard).items()}
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in merged.values())
    reference = wrapped.merge_and_unload().state_dict()  # the library's own merge, on the real UNet
    assert set(merged) == set(reference)
    for key, value in merged.items():
        assert value.dtype == torch.float16
        torch.testing.assert_close(value, reference[key].half(), rtol=1e-3, atol=1e-3, msg=key)


def test_weight_and_bias_in_different_shards(tmp_path) -> None:
    state = {k: v.contiguous() for k, v in planted_model().state_dict().items()}
    (tmp_path / "base").mkdir()
    save_file(
        {k: v for k, v in state.items() if k != "lin.bias"}, str(tmp_path / "base" / "model-00001-of-00002.safetensors")
    )
    save_file({"lin.bias": state["lin.bias"]}, str(tmp_path / "base" / "model-00002-of-00002.safetensors"))
    adapter = tmp_path / "full.safetensors"
    _save_adapter("full", adapter)
    assert main(["merge", str(tmp_path / "base"), str(adapter), "--out", str(tmp_path / "out")]) == 0
    merged = {
        **load_file(tmp_path / "out" / "model-00001-of-00002.safetensors"),
        **load_file(tmp_path / "out" / "model-00002-of-00002.safetensors"),
    }
    expected = _expected(state, [(adapter, 1.0)])
    _assert_merged(merged, expected, state, _touched([adapter]))
    assert not torch.equal(merged["lin.bias"], state["lin.bias"])  # the bias delta reached the other shard
