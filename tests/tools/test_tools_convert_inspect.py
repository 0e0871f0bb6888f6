"""``beyondlora convert`` round-trips every delta between single files and PEFT folders; ``beyondlora
inspect`` reports what is in a file.  ΔW comes from the independent UI formula (tests/helpers/ui_formula.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import beyondlora as bl
from beyondlora.cli import main
from beyondlora.formats.single_file import group_by_module
from helpers.tool_cases import low_rank, planted_model, save_state, state_of, tiny_text_encoder, tiny_unet
from helpers.ui_formula import ui_delta

CONFIGS = {
    "lora": lambda: bl.LoraConfig(r=4, alpha=8, target_modules=["lin", "conv", "token_embedding"], init_weights=False),
    "loha": lambda: bl.LoHaConfig(r=4, alpha=2, target_modules=["lin", "conv"], init_weights=False),
    "loha_tucker": lambda: bl.LoHaConfig(
        r=3, alpha=5, target_modules=["conv"], use_effective_conv2d=True, init_weights=False
    ),
    "lokr": lambda: bl.LoKrConfig(r=2, alpha=6, decompose_factor=4, target_modules=["lin", "conv"], init_weights=False),
    "lokr_full": lambda: bl.LoKrConfig(r=64, alpha=3, target_modules=["lin"], init_weights=False),
    "ia3": lambda: bl.IA3Config(target_modules=["pw", "proj"], feedforward_modules=["pw"], init_weights=False),
    "full": lambda: bl.FullConfig(target_modules=["lin", "conv"], init_weights=False),
    "norm": lambda: bl.NormConfig(target_modules=["norm"], init_weights=False),
    "dora": lambda: bl.LoraConfig(r=4, alpha=4, target_modules=["lin", "proj"], use_dora=True, init_weights=False),
}


def _weights() -> dict[str, torch.Tensor]:
    """Canonical base weights by flattened module name."""
    state = planted_model().state_dict()
    out = {name.replace(".", "_"): state[f"{name}.weight"] for name in ("lin", "conv", "pw", "norm", "block.proj")}
    out["token_embedding"] = state["token_embedding.weight"].t()
    return out


def _file_deltas(path, prefix: str = "lycoris") -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    weights = _weights()
    out = {}
    for key, params in group_by_module(load_file(path)).items():
        name = key[len(prefix) + 1 :]
        out[name] = ui_delta(params, weights[name].double())
    return out


def _assert_same_deltas(first, second) -> None:
    a, b = _file_deltas(first), _file_deltas(second)
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name][0], b[name][0], rtol=1e-5, atol=1e-6, msg=name)
        if a[name][1] is not None or b[name][1] is not None:
            torch.testing.assert_close(a[name][1], b[name][1], rtol=1e-5, atol=1e-6, msg=name)


def _assert_same_folders(first, second) -> None:
    """Byte for byte the same ``adapter_config.json``, and the same tensors (names, dtypes, values)."""
    assert (first / "adapter_config.json").read_text() == (second / "adapter_config.json").read_text()
    a, b = load_file(first / "adapter_model.safetensors"), load_file(second / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.fixture
def base_file(tmp_path):
    return save_state(state_of(planted_model()), tmp_path / "base.safetensors")


@pytest.mark.parametrize("algorithm", sorted(CONFIGS))
def test_convert_round_trips_every_delta(tmp_path, base_file, algorithm) -> None:
    torch.manual_seed(3)
    model = bl.get_peft_model(planted_model(), CONFIGS[algorithm]())
    source = tmp_path / "source.safetensors"
    model.save_pretrained(str(source))
    folder, back = tmp_path / "folder", tmp_path / "back.safetensors"
    assert main(["convert", str(source), str(folder), "--base", str(base_file)]) == 0
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert main(["convert", str(folder), str(back), "--base", str(base_file)]) == 0
    _assert_same_deltas(source, back)
    recorded = tmp_path / "recorded"  # our file records its modules' paths and layers: no base needed
    assert main(["convert", str(source), str(recorded)]) == 0
    _assert_same_folders(folder, recorded)


def test_single_file_to_folder_without_base_needs_our_metadata(tmp_path, base_file, capsys) -> None:
    """Modules saved whole (modules_to_save) come along; a file without our records (LyCORIS', kohya's) still
    asks for the base, saying why, and writes nothing."""
    torch.manual_seed(6)
    config = bl.LoraConfig(r=4, alpha=8, target_modules=["lin", "conv", "block.proj"], modules_to_save=["norm"])
    model = bl.get_peft_model(planted_model(), config)
    source = tmp_path / "source.safetensors"
    model.save_pretrained(str(source))
    with_base, recorded = tmp_path / "with-base", tmp_path / "recorded"
    assert main(["convert", str(source), str(with_base), "--base", str(base_file)]) == 0
    assert main(["convert", str(source), str(recorded)]) == 0
    _assert_same_folders(with_base, recorded)
    assert "base_model.model.norm.weight" in load_file(recorded / "adapter_model.safetensors")
    capsys.readouterr()
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(source), str(bare))  # the same tensors without our metadata
    assert main(["convert", str(bare), str(tmp_path / "refused")]) == 2
    assert "needs the base model (--base MODEL)" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    diffusers_layout = tmp_path / "diffusers.safetensors"  # keys of another layout, no records: the same answer
    save_file({"lin.lora_A.weight": torch.zeros(2, 48), "lin.lora_B.weight": torch.zeros(64, 2)}, str(diffusers_layout))
    assert main(["convert", str(diffusers_layout), str(tmp_path / "refused")]) == 2
    assert "needs the base model (--base MODEL)" in capsys.readouterr().err


def test_an_extracted_file_converts_to_a_folder_without_base(tmp_path, base_file) -> None:
    """``extract`` records the module paths and layers too: the folder without ``--base`` is the one with it."""
    base = state_of(planted_model())
    generator = torch.Generator().manual_seed(8)
    tuned = dict(base, **{"lin.weight": base["lin.weight"] + low_rank(64, 48, 4, generator)})
    tuned["conv.weight"] = base["conv.weight"] + low_rank(32, 16 * 9, 2, generator).reshape(32, 16, 3, 3)
    save_state(tuned, tmp_path / "tuned.safetensors")
    extracted = tmp_path / "extracted.safetensors"
    assert main(["extract", str(base_file), str(tmp_path / "tuned.safetensors"), str(extracted)]) == 0
    assert main(["convert", str(extracted), str(tmp_path / "with-base"), "--base", str(base_file)]) == 0
    assert main(["convert", str(extracted), str(tmp_path / "recorded")]) == 0
    _assert_same_folders(tmp_path / "with-base", tmp_path / "recorded")


def test_ia3_meaning_is_kept_or_the_conversion_refused(tmp_path, base_file, capsys) -> None:
    """(IA)³ scaling its layers' bias (PEFT's meaning): folder → file keeps it in our metadata, warning that LyCORIS
    and the UIs leave the bias unchanged, and file → folder gives the same tensors back.  The same file without
    our metadata means LyCORIS' (IA)³, bias kept, which no PEFT folder says on a biased layer: refused."""
    torch.manual_seed(7)
    model = bl.get_peft_model(planted_model(), bl.IA3Config(target_modules=["lin", "conv"], init_weights=False))
    folder, single, again = tmp_path / "folder", tmp_path / "single.safetensors", tmp_path / "again"
    model.save_pretrained(str(folder))
    with pytest.warns(UserWarning, match="LyCORIS leaves the bias unchanged"):
        assert main(["convert", str(folder), str(single), "--base", str(base_file)]) == 0
    with safe_open(str(single), "pt") as handle:
        assert all(r["scale_bias"] for r in json.loads(handle.metadata()["beyondlora_modules"]).values())
    assert main(["convert", str(single), str(again)]) == 0
    first, second = load_file(folder / "adapter_model.safetensors"), load_file(again / "adapter_model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    capsys.readouterr()
    assert main(["inspect", str(single), "--json", "--base", str(base_file)]) == 0
    lin = {m["module"]: m for m in json.loads(capsys.readouterr().out)["modules"]}["lin"]
    v = model.base_model.lin.adapters["default"].weight.detach()
    assert "scales bias" in lin["notes"]
    assert lin["bias_delta_norm"] == pytest.approx(float((planted_model().lin.bias * v).norm()), rel=1e-5)
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(single), str(bare))
    capsys.readouterr()
    assert main(["convert", str(bare), str(tmp_path / "refused"), "--base", str(base_file)]) == 2
    assert "leaves it unchanged (scale_bias=False, LyCORIS' semantics)" in capsys.readouterr().err
    assert not (tmp_path / "refused" / "adapter_model.safetensors").exists()


def test_single_file_dtype_conversion_needs_no_base(tmp_path) -> None:
    torch.manual_seed(4)
    model = bl.get_peft_model(planted_model(), CONFIGS["lokr"]())
    source, half = tmp_path / "source.safetensors", tmp_path / "half.safetensors"
    model.save_pretrained(str(source))
    assert main(["convert", str(source), str(half), "--dtype", "fp16"]) == 0
    original, converted = load_file(source), load_file(half)
    assert set(original) == set(converted)
    for key, tensor in converted.items():
        if key.endswith(".alpha"):
            assert tensor.dtype == torch.float32 and torch.equal(tensor, original[key])  # the scale stays exact
        else:
            assert tensor.dtype == torch.float16 and torch.equal(tensor, original[key].half())
    with safe_open(str(source), "pt") as a, safe_open(str(half), "pt") as b:
        assert a.metadata() == b.metadata()


def test_pipeline_component_to_peft_folder_loads_in_the_real_unet(tmp_path) -> None:
    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "pipe" / "unet", safe_serialization=True)
    tiny_text_encoder().save_pretrained(tmp_path / "pipe" / "text_encoder", safe_serialization=True)
    torch.manual_seed(5)
    config = bl.LoraConfig(r=4, alpha=2, target_modules=["to_q", "to_v", "conv1"], init_weights=False)
    wrapped = bl.get_peft_model(tiny_unet(), config)
    single = tmp_path / "unet.safetensors"
    wrapped.save_pretrained(str(single), prefix="lora_unet")
    folder = tmp_path / "unet-folder"
    assert main(["convert", str(single), str(folder), "--base", str(tmp_path / "pipe")]) == 0
    keys = load_file(folder / "adapter_model.safetensors")
    assert all(
        k.startswith("base_model.model.down_blocks.")
        or k.startswith("base_model.model.up_blocks.")
        or k.startswith("base_model.model.mid_block.")
        for k in keys
    )
    reloaded = bl.PeftModel.from_pretrained(tiny_unet(), str(folder))
    sample, t, hidden = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(sample, t, hidden).sample, wrapped(sample, t, hidden).sample)
    # merging the PEFT folder into the whole pipeline finds its component (the UNet) by itself
    assert main(["merge", str(tmp_path / "pipe"), str(folder), "--out", str(tmp_path / "merged")]) == 0
    merged = load_file(tmp_path / "merged" / "unet" / "diffusion_pytorch_model.safetensors")
    reference = wrapped.merge_and_unload().state_dict()
    for key, value in merged.items():
        torch.testing.assert_close(value, reference[key], rtol=1e-5, atol=1e-6, msg=key)
    # a file for the UNet and the text encoder cannot become one PEFT folder
    mixed = {**load_file(single), "lora_te_text_model_encoder_layers_0_mlp_fc1.diff": torch.zeros(37, 32)}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    assert (
        main(["convert", str(tmp_path / "mixed.safetensors"), str(tmp_path / "x"), "--base", str(tmp_path / "pipe")])
        == 2
    )
    assert not (tmp_path / "x").exists()


ROTATIONS = {
    "oft": lambda: bl.OFTConfig(
        r=4, constraint=0.01, rescaled=True, target_modules=["lin", "conv", "block.proj"], init_weights=False
    ),
    "boft": lambda: bl.BOFTConfig(r=4, target_modules=["lin", "conv"], init_weights=False),
}


@pytest.mark.parametrize("algorithm", sorted(ROTATIONS))
def test_rotations_convert_to_files_not_folders_and_inspect(tmp_path, base_file, algorithm, capsys) -> None:
    torch.manual_seed(8)
    model = bl.get_peft_model(planted_model(), ROTATIONS[algorithm]())
    source, half = tmp_path / "source.safetensors", tmp_path / "half.safetensors"
    model.save_pretrained(str(source))
    capsys.readouterr()
    assert main(["convert", str(source), str(tmp_path / "folder"), "--base", str(base_file)]) == 2
    assert "rotate the layer's input" in capsys.readouterr().err and not (tmp_path / "folder").exists()
    assert main(["convert", str(source), str(half), "--dtype", "fp16"]) == 0
    assert load_file(half)["lycoris_lin.oft_blocks"].dtype == torch.float16
    capsys.readouterr()
    assert main(["inspect", str(source), "--json", "--base", str(base_file)]) == 0
    modules = {m["module"]: m for m in json.loads(capsys.readouterr().out)["modules"]}
    weights = _weights()
    for key, params in group_by_module(load_file(source)).items():
        name = key[len("lycoris_") :]
        entry = modules[name.replace("block_proj", "block.proj")]  # with the base: the model's module names
        assert entry["algorithm"] == algorithm and entry["params"] == _independent_count(params)
        expected = float(ui_delta(params, weights[name].double())[0].norm())
        assert entry["delta_norm"] == pytest.approx(expected, rel=1e-5), name
    lin = modules["lin"]["notes"]
    if algorithm == "oft":
        assert "16 blocks × 4" in lin and "constraint 0.01" in lin and "rescaled" in lin
    else:
        assert "5 stages of 16 blocks × 4" in lin


def _independent_count(params: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for n, t in params.items() if n not in ("alpha", "on_input"))


def test_inspect_reports_modules_ranks_params_norms_and_metadata(tmp_path, base_file, capsys) -> None:
    torch.manual_seed(6)
    files = {}
    for algorithm in ("lora", "lokr", "ia3", "full"):
        model = bl.get_peft_model(planted_model(), CONFIGS[algorithm]())
        files[algorithm] = tmp_path / f"{algorithm}.safetensors"
        model.save_pretrained(str(files[algorithm]))
    mixed = {k: v for k, v in load_file(files["lora"]).items() if k.startswith("lycoris_lin.")}
    mixed |= {k: v for k, v in load_file(files["lokr"]).items() if k.startswith("lycoris_conv.")}
    mixed |= load_file(files["ia3"])
    path = tmp_path / "mixed.safetensors"
    save_file(mixed, str(path), metadata={"ss_output_name": "mixed"})
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    grouped = group_by_module(mixed)
    modules = {m["module"]: m for m in info["modules"]}
    assert set(modules) == set(grouped)
    weights = _weights()
    expected_norms = {}
    for key, params in grouped.items():
        entry = modules[key]
        assert entry["params"] == _independent_count(params), key
        if key != "lycoris_pw" and key != "lycoris_block_proj":
            expected_norms[key] = float(ui_delta(params, weights[key[len("lycoris_") :]].double())[0].norm())
            assert entry["delta_norm"] == pytest.approx(expected_norms[key], rel=1e-5), key
    lin, conv, pw = modules["lycoris_lin"], modules["lycoris_conv"], modules["lycoris_pw"]
    assert (lin["algorithm"], lin["rank"], lin["alpha"], lin["shape"]) == ("lora", 4, 8.0, [64, 48])
    # lokr_w2_b (r, d·k) does not say the kernel: without the base the shape folds it into in
    assert (conv["algorithm"], conv["rank"], conv["alpha"], conv["shape"]) == ("lokr", 2, 6.0, [32, 144])
    assert any("folded" in note for note in conv["notes"])
    assert pw["algorithm"] == "ia3" and pw["delta_norm"] is None and "on input" in pw["notes"]
    totals = info["totals"]
    assert totals["modules"] == 4 and totals["algorithms"] == {"ia3": 2, "lokr": 1, "lora": 1}
    assert totals["params"] == sum(_independent_count(p) for p in grouped.values())
    assert totals["delta_norm"] == pytest.approx(sum(n * n for n in expected_norms.values()) ** 0.5, rel=1e-5)
    assert info["metadata"] == {"ss_output_name": "mixed"} and info["format"] == "single_file"
    # with the base, (IA)³'s ΔW = W ⊙ v along the input axis is known too, and ‖ΔW‖ / ‖W‖
    assert main(["inspect", str(path), "--json", "--base", str(base_file)]) == 0
    with_base = {m["module"]: m for m in json.loads(capsys.readouterr().out)["modules"]}
    assert with_base["conv"]["shape"] == [32, 16, 3, 3]
    v = grouped["lycoris_pw"]["weight"].double().reshape(1, -1, 1, 1)
    expected = weights["pw"].double() * v
    assert with_base["pw"]["delta_norm"] == pytest.approx(float(expected.norm()), rel=1e-5)
    assert with_base["lin"]["relative_delta_norm"] == pytest.approx(
        expected_norms["lycoris_lin"] / float(weights["lin"].double().norm()), rel=1e-5
    )
    assert main(["inspect", str(files["full"])]) == 0
    text = capsys.readouterr().out
    assert "lycoris_lin" in text and "‖Δb‖" in text and "total: 2 module(s) (full 2)" in text
    assert "beyondlora_version" in text


def test_inspect_a_peft_folder(tmp_path, base_file, capsys) -> None:
    torch.manual_seed(7)
    model = bl.get_peft_model(planted_model(), CONFIGS["loha"]())
    model.save_pretrained(str(tmp_path / "folder"))
    model.save_pretrained(str(tmp_path / "same.safetensors"))
    assert main(["inspect", str(tmp_path / "folder"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "peft_folder" and "adapter_config" in info["metadata"]
    norms = {name: float(delta.norm()) for name, (delta, _) in _file_deltas(tmp_path / "same.safetensors").items()}
    assert {m["module"]: m["delta_norm"] for m in info["modules"]} == pytest.approx(norms, rel=1e-5)


def test_diffusers_layout_written_for_diffusers_and_read_back(tmp_path) -> None:
    tiny_unet().save_pretrained(tmp_path / "pipe" / "unet", safe_serialization=True)
    tiny_text_encoder().save_pretrained(tmp_path / "pipe" / "text_encoder", safe_serialization=True)
    torch.manual_seed(8)
    config = bl.LoraConfig(r=4, alpha=2, target_modules=["to_q", "to_k", "conv1"], init_weights=False)
    unet = bl.get_peft_model(tiny_unet(), config)
    unet.save_pretrained(str(tmp_path / "u.safetensors"), prefix="lora_unet")
    config = bl.LoraConfig(r=2, alpha=5, target_modules=["q_proj", "fc1"], init_weights=False)
    text_encoder = bl.get_peft_model(tiny_text_encoder(), config)
    text_encoder.save_pretrained(str(tmp_path / "t.safetensors"), prefix="lora_te")
    both = tmp_path / "a.safetensors"
    save_file({**load_file(tmp_path / "u.safetensors"), **load_file(tmp_path / "t.safetensors")}, str(both))
    layout = tmp_path / "d.safetensors"
    assert main(["convert", str(both), str(layout), "--base", str(tmp_path / "pipe"), "--layout", "diffusers"]) == 0
    state = load_file(layout)
    assert all(
        k.startswith(("unet.", "text_encoder.")) and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state
    )
    # diffusers (with PEFT) loads it to our outputs: an independent consumer
    from diffusers import StableDiffusionPipeline

    fresh_unet, fresh_text_encoder = tiny_unet(), tiny_text_encoder()
    fresh_unet.load_lora_adapter(state, prefix="unet")
    StableDiffusionPipeline.load_lora_into_text_encoder(
        state, network_alphas=None, text_encoder=fresh_text_encoder, prefix="text_encoder"
    )
    sample, t, hidden, ids = (
        torch.randn(1, 4, 8, 8),
        torch.tensor([3]),
        torch.randn(1, 5, 32),
        torch.randint(0, 100, (1, 7)),
    )
    with torch.no_grad():
        torch.testing.assert_close(fresh_unet(sample, t, hidden).sample, unet(sample, t, hidden).sample)
        torch.testing.assert_close(fresh_text_encoder(ids).last_hidden_state, text_encoder(ids).last_hidden_state)
    # and back to a single file without a base: the same ΔW per module
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(layout), str(back)]) == 0
    original, returned = group_by_module(load_file(both)), group_by_module(load_file(back))
    assert set(returned) == {k.replace("lora_te_", "lora_te_text_model_") for k in original}
    for key, params in original.items():
        out_dim, in_dim = params["lora_up.weight"].shape[0], params["lora_down.weight"][0].numel()
        zero = torch.zeros(out_dim, in_dim, dtype=torch.float64)
        flat = {k: v.flatten(1) if v.dim() > 1 else v for k, v in params.items()}
        again = {
            k: v.flatten(1) if v.dim() > 1 else v
            for k, v in returned[key.replace("lora_te_", "lora_te_text_model_")].items()
        }
        torch.testing.assert_close(ui_delta(again, zero)[0], ui_delta(flat, zero)[0], rtol=1e-5, atol=1e-7, msg=key)
    # merging the diffusers-layout file equals merging the single file
    for name, source in (("from-single", both), ("from-diffusers", layout)):
        assert main(["merge", str(tmp_path / "pipe"), str(source), "--out", str(tmp_path / name)]) == 0
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        first, second = load_file(tmp_path / "from-single" / part), load_file(tmp_path / "from-diffusers" / part)
        for key in first:
            torch.testing.assert_close(first[key], second[key], rtol=1e-6, atol=1e-7, msg=key)


def test_diffusers_metadata_alphas_patterns_and_rslora() -> None:
    from beyondlora.tools.diffusers_layout import to_single_file

    g = torch.Generator().manual_seed(9)
    tensors = {}
    for path in ("down_blocks.0.attn.to_q", "down_blocks.0.attn.to_k", "mid.to_q_extra"):
        tensors[f"unet.{path}.lora_A.weight"] = torch.randn(4, 8, generator=g)
        tensors[f"unet.{path}.lora_B.weight"] = torch.randn(6, 4, generator=g)
    tensors["text_encoder.encoder.layers.0.fc1.lora_A.weight"] = torch.randn(2, 8, generator=g)
    tensors["text_encoder.encoder.layers.0.fc1.lora_B.weight"] = torch.randn(6, 2, generator=g)
    metadata = {
        "lora_adapter_metadata": json.dumps(
            {"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {"to_q": 2}, "text_encoder.use_rslora": True}
        )
    }
    single = to_single_file(tensors, metadata, "test")
    alphas = {k.rpartition(".")[0]: float(v) for k, v in single.items() if k.endswith(".alpha")}
    assert alphas == {
        "lora_unet_down_blocks_0_attn_to_q": 2.0,  # PEFT's pattern rule: the path ends with "to_q"
        "lora_unet_down_blocks_0_attn_to_k": 8.0,
        "lora_unet_mid_to_q_extra": 8.0,  # "to_q" is not a whole trailing segment here
        "lora_te_text_model_encoder_layers_0_fc1": pytest.approx(
            2 * 2**0.5
        ),  # rs-LoRA: alpha/√r = (alpha·√r)/r, alpha = r
    }


def test_glora_converts_between_single_files_inspects_and_refuses_folders(tmp_path, base_file, capsys) -> None:
    torch.manual_seed(4)
    config = bl.GLoRAConfig(r=3, alpha=2, target_modules=["lin", "conv"], init_weights=False)
    source = tmp_path / "glora.safetensors"
    bl.get_peft_model(planted_model(), config).save_pretrained(str(source))
    back = tmp_path / "again.safetensors"
    assert main(["convert", str(source), str(back), "--base", str(base_file)]) == 0
    _assert_same_deltas(source, back)
    assert main(["convert", str(source), str(tmp_path / "folder"), "--base", str(base_file)]) != 0
    assert "PEFT's GLoRA is another method" in capsys.readouterr().err
    assert not (tmp_path / "folder" / "adapter_model.safetensors").exists()
    assert main(["inspect", str(source), "--json"]) == 0
    modules = {m["module"]: m for m in json.loads(capsys.readouterr().out)["modules"]}
    conv = modules["lycoris_conv"]
    assert (conv["algorithm"], conv["rank"], conv["alpha"], conv["shape"]) == ("glora", 3, 2.0, [32, 16, 3, 3])
    assert conv["delta_norm"] is None and any("depends on the base weight" in n for n in conv["notes"])
    assert main(["inspect", str(source), "--json", "--base", str(base_file)]) == 0
    with_base = {m["module"]: m for m in json.loads(capsys.readouterr().out)["modules"]}
    for name, (delta, _) in _file_deltas(source).items():
        assert with_base[name]["delta_norm"] == pytest.approx(float(delta.norm()), rel=1e-5), name
