"""Adapters on SD3 and Flux pipelines (transformer, CLIP-L/G, T5): kohya/ComfyUI files with fused qkv / linear1
keys load to what a UI computes, live and merged; the same adapter written with kohya, LyCORIS (SimpleTuner)
and diffusers names reloads to the live outputs; diffusers reads our LoRA files; bad files change nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import beyondlora as bl
from beyondlora.errors import FormatError
from beyondlora.integrations.diffusers import UnmatchedKeysWarning, list_adapters, load_adapter, save_adapter
from helpers.dit_helpers import (
    TEXT_ENCODERS,
    adapter_layer_count,
    assert_changed,
    assert_close,
    dit_outputs,
    make_dit,
)
from helpers.sd_helpers import random_params
from helpers.ui_formula import ui_delta

H = 16  # the tiny transformers' width
QKV = ("to_q", "to_k", "to_v")
ADD_QKV = ("add_q_proj", "add_k_proj", "add_v_proj")

# file key → (part, [(diffusers module, its rows or None for all)] in the file's row order); written by hand
# from the checkpoints' layouts: qkv stacks q, k, v; Flux's linear1 stacks q, k, v and the MLP's input; the
# final (and SD3's last context) adaLN modulation holds (shift, scale) where diffusers holds (scale, shift)
FLUX_KEYS = {
    "lora_unet_double_blocks_0_img_attn_qkv": ("transformer", [(f"transformer_blocks.0.attn.{m}", None) for m in QKV]),
    "lora_unet_double_blocks_1_txt_attn_qkv": (
        "transformer",
        [(f"transformer_blocks.1.attn.{m}", None) for m in ADD_QKV],
    ),
    "lora_unet_single_blocks_0_linear1": (
        "transformer",
        [
            *((f"single_transformer_blocks.0.attn.{m}", None) for m in QKV),
            ("single_transformer_blocks.0.proj_mlp", None),
        ],
    ),
    "lora_unet_single_blocks_1_linear2": ("transformer", [("single_transformer_blocks.1.proj_out", None)]),
    "lora_unet_double_blocks_0_img_mlp_0": ("transformer", [("transformer_blocks.0.ff.net.0.proj", None)]),
    "lora_unet_double_blocks_1_txt_mod_lin": ("transformer", [("transformer_blocks.1.norm1_context.linear", None)]),
    "lora_unet_single_blocks_0_modulation_lin": ("transformer", [("single_transformer_blocks.0.norm.linear", None)]),
    "lora_unet_final_layer_adaLN_modulation_1": (
        "transformer",
        [("norm_out.linear", (H, 2 * H)), ("norm_out.linear", (0, H))],
    ),
    "lora_unet_img_in": ("transformer", [("x_embedder", None)]),
    "lora_unet_guidance_in_in_layer": ("transformer", [("time_text_embed.guidance_embedder.linear_1", None)]),
    "lora_unet_final_layer_linear": ("transformer", [("proj_out", None)]),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (
        "text_encoder",
        [("encoder.layers.0.self_attn.q_proj", None)],
    ),
    "lora_te1_text_model_encoder_layers_1_mlp_fc2": ("text_encoder", [("encoder.layers.1.mlp.fc2", None)]),
    "lora_te3_encoder_block_0_layer_0_SelfAttention_q": (
        "text_encoder_2",
        [("encoder.block.0.layer.0.SelfAttention.q", None)],
    ),
    "lora_te3_encoder_block_1_layer_1_DenseReluDense_wi_0": (
        "text_encoder_2",
        [("encoder.block.1.layer.1.DenseReluDense.wi_0", None)],
    ),
}
SD3_KEYS = {
    "lora_unet_joint_blocks_0_x_block_attn_qkv": (
        "transformer",
        [(f"transformer_blocks.0.attn.{m}", None) for m in QKV],
    ),
    "lora_unet_joint_blocks_0_x_block_attn2_qkv": (
        "transformer",
        [(f"transformer_blocks.0.attn2.{m}", None) for m in QKV],
    ),
    "lora_unet_joint_blocks_1_context_block_attn_qkv": (
        "transformer",
        [(f"transformer_blocks.1.attn.{m}", None) for m in ADD_QKV],
    ),
    "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1": (
        "transformer",
        [
            ("transformer_blocks.2.norm1_context.linear", (H, 2 * H)),
            ("transformer_blocks.2.norm1_context.linear", (0, H)),
        ],
    ),
    "lora_unet_joint_blocks_0_x_block_mlp_fc2": ("transformer", [("transformer_blocks.0.ff.net.2", None)]),
    "lora_unet_joint_blocks_1_x_block_adaLN_modulation_1": (
        "transformer",
        [("transformer_blocks.1.norm1.linear", None)],
    ),
    "lora_unet_joint_blocks_0_x_block_adaLN_modulation_1": (
        "transformer",
        [("transformer_blocks.0.norm1.linear", None)],
    ),
    "lora_unet_joint_blocks_1_context_block_attn_proj": (
        "transformer",
        [("transformer_blocks.1.attn.to_add_out", None)],
    ),
    "lora_unet_t_embedder_mlp_0": ("transformer", [("time_text_embed.timestep_embedder.linear_1", None)]),
    "lora_unet_y_embedder_mlp_2": ("transformer", [("time_text_embed.text_embedder.linear_2", None)]),
    "lora_unet_context_embedder": ("transformer", [("context_embedder", None)]),
    "lora_unet_final_layer_adaLN_modulation_1": (
        "transformer",
        [("norm_out.linear", (H, 2 * H)), ("norm_out.linear", (0, H))],
    ),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (
        "text_encoder",
        [("text_model.encoder.layers.0.self_attn.q_proj", None)],
    ),
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": ("text_encoder_2", [("text_model.encoder.layers.1.mlp.fc1", None)]),
    "lora_te3_encoder_block_0_layer_1_DenseReluDense_wo": (
        "text_encoder_3",
        [("encoder.block.0.layer.1.DenseReluDense.wo", None)],
    ),
}
KEYS = {"flux": FLUX_KEYS, "sd3": SD3_KEYS}
MIXED = ("lora", "loha", "lokr", "full")


def _weight(pipe, part: str, module: str) -> torch.Tensor:
    return getattr(pipe, part).get_submodule(module).weight


def _fused_shape(pipe, part: str, segments) -> tuple[int, int]:
    rows = sum(_weight(pipe, part, m).shape[0] if r is None else r[1] - r[0] for m, r in segments)
    return rows, _weight(pipe, part, segments[0][0]).shape[1]


def _spec(algo: str, out: int, i: int) -> dict:
    spec = {"algo": algo, "r": 2 + i % 2, "alpha": 1.0 + 0.5 * (i % 3)}
    if algo == "lokr":  # W2 of 8 rows: every fused split (16 rows) falls on W1's row blocks
        spec.update(a=out // 8, c=4)
    return spec


def write_file(pipe, kind: str, algo: str, path, seed: int = 0, keys: dict | None = None) -> dict:
    """A kohya/ComfyUI-named file of random modules (``algo``, or the algorithms in turn for ``mixed``)."""
    generator = torch.Generator().manual_seed(seed)
    tensors, by_key = {}, {}
    for i, (key, (part, segments)) in enumerate((keys or KEYS[kind]).items()):
        out, inp = _fused_shape(pipe, part, segments)
        spec = _spec(MIXED[i % len(MIXED)] if algo == "mixed" else algo, out, i)
        by_key[key] = random_params(spec, torch.zeros(out, inp, dtype=torch.float64), generator)
        tensors.update({f"{key}.{n}": t.float() if t.is_floating_point() else t for n, t in by_key[key].items()})
    save_file(tensors, str(path))
    return by_key


@torch.no_grad()
def apply_reference(pipe, kind: str, by_key: dict, multiplier: float) -> None:
    """W += t · ΔW with each fused ΔW (an independent UI formula) cut into the rows of its modules."""
    for key, (part, segments) in KEYS[kind].items():
        out, inp = _fused_shape(pipe, part, segments)
        delta, bias = ui_delta(
            {n: t.float() for n, t in by_key[key].items()}, torch.zeros(out, inp, dtype=torch.float64)
        )
        start = 0
        for module_name, rows in segments:
            module = getattr(pipe, part).get_submodule(module_name)
            lo, hi = rows or (0, module.weight.shape[0])
            module.weight[lo:hi] += (multiplier * delta[start : start + hi - lo]).to(module.weight.dtype)
            if bias is not None:
                module.bias[lo:hi] += (multiplier * bias[start : start + hi - lo]).to(module.bias.dtype)
            start += hi - lo


def reference_outputs(kind: str, by_key: dict, multiplier: float) -> dict:
    reference = make_dit(kind)
    apply_reference(reference, kind, by_key, multiplier)
    return dit_outputs(reference, kind)


def module_keys(path) -> set[str]:
    return {key.partition(".")[0] for key in load_file(str(path))}


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr", "mixed"])
@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_kohya_files_apply_what_a_ui_computes_and_resave_under_every_name(kind: str, algo: str, tmp_path) -> None:
    pipe = make_dit(kind)
    base = dit_outputs(pipe, kind)
    by_key = write_file(pipe, kind, algo, tmp_path / "kohya.safetensors")
    expected = reference_outputs(kind, by_key, 0.7)
    assert_changed(expected, base)
    load_adapter(pipe, tmp_path / "kohya.safetensors", multiplier=0.7, strict=True)
    live = dit_outputs(pipe, kind)
    assert_close(live, expected)

    save_adapter(pipe, tmp_path / "ours.safetensors")  # kohya names: fused layers joined back
    assert module_keys(tmp_path / "ours.safetensors") == set(KEYS[kind])
    save_adapter(pipe, tmp_path / "lycoris.safetensors", names="lycoris")  # diffusers paths, one key per layer
    written = module_keys(tmp_path / "lycoris.safetensors")
    assert "lycoris_transformer_blocks_0_attn_to_q" in written and not any(k.startswith("lora_unet") for k in written)
    for name in ("ours", "lycoris"):
        fresh = make_dit(kind)
        load_adapter(fresh, tmp_path / f"{name}.safetensors", strict=True)
        assert_close(dit_outputs(fresh, kind), live)


def _wrap(pipe, kind: str, algo: str, text_encoders: tuple[str, ...] | None = None) -> None:
    """``pipe.<part> = get_peft_model(pipe.<part>, config)`` on every linear, with random (non-identity) adapters."""
    torch.manual_seed(3)
    make = {
        "lora": lambda: bl.LoraConfig(r=4, alpha=2.0, target_modules="all-linear", init_weights=False),
        "loha": lambda: bl.LoHaConfig(r=2, alpha=1.0, target_modules="all-linear", init_weights=False),
        "lokr": lambda: bl.LoKrConfig(r=2, target_modules="all-linear", init_weights=False),
    }[algo]
    for part in ("transformer", *(TEXT_ENCODERS[kind] if text_encoders is None else text_encoders)):
        setattr(pipe, part, bl.get_peft_model(getattr(pipe, part), make()))
        getattr(pipe, part).eval()


@pytest.mark.parametrize("algo", ["lora", "loha", "lokr"])
@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_trained_adapters_reload_to_their_live_outputs(kind: str, algo: str, tmp_path) -> None:
    pipe = make_dit(kind)
    base = dit_outputs(pipe, kind)
    _wrap(pipe, kind, algo)
    live = dit_outputs(pipe, kind)
    assert_changed(live, base)
    names = ["lycoris"]
    if algo == "lokr":  # q, k, v trained apart have three W2s: no W1 ⊗ W2 holds them
        blocks = "double_blocks" if kind == "flux" else "joint_blocks"
        with pytest.raises(
            FormatError, match=rf"lora_unet_{blocks}_\d+_\w+_qkv: a fused LoKr is one W1 ⊗ W2.*share W2"
        ):
            save_adapter(pipe, tmp_path / "kohya.safetensors")
        assert not (tmp_path / "kohya.safetensors").exists()
    else:
        names.append("kohya")
    for name in names:
        save_adapter(pipe, tmp_path / f"{name}.safetensors", names=name)
        fresh = make_dit(kind)
        load_adapter(fresh, tmp_path / f"{name}.safetensors", strict=True)
        assert_close(dit_outputs(fresh, kind), live)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_diffusers_loads_our_lora_files_to_the_same_outputs(kind: str, tmp_path) -> None:
    clips = ("text_encoder",) if kind == "flux" else ("text_encoder", "text_encoder_2")
    pipe = make_dit(kind)
    _wrap(pipe, kind, "lora", text_encoders=clips)
    live = dit_outputs(pipe, kind)
    save_adapter(pipe, tmp_path / "diffusers.safetensors", names="diffusers")
    assert all(
        k.startswith(("transformer.", "text_encoder.", "text_encoder_2."))
        for k in load_file(str(tmp_path / "diffusers.safetensors"))
    )
    theirs = make_dit(kind)
    theirs.load_lora_weights(str(tmp_path / "diffusers.safetensors"))
    assert_close(dit_outputs(theirs, kind), live, rtol=1e-5, atol=1e-6)
    ours = make_dit(kind)
    load_adapter(ours, tmp_path / "diffusers.safetensors", strict=True)
    assert_close(dit_outputs(ours, kind), live)
    t5 = TEXT_ENCODERS[kind][-1]  # no diffusers loader of these pipelines takes a T5 LoRA
    setattr(pipe, t5, bl.get_peft_model(getattr(pipe, t5), bl.LoraConfig(r=2, target_modules=["q", "v"])))
    with pytest.raises(FormatError, match=rf"the {t5} \(T5\).*names='kohya' or 'lycoris'"):
        save_adapter(pipe, tmp_path / "t5.safetensors", names="diffusers")


DOUBLE_BLOCK_LINEARS = (
    r"transformer_blocks\.\d+\.(attn\.(to_[qkv]|add_[qkv]_proj|to_out\.0|to_add_out)"
    r"|ff(_context)?\.net\.(0\.proj|2)|norm1(_context)?\.linear)"
)


def test_diffusers_reads_our_kohya_flux_names(tmp_path) -> None:
    """diffusers' kohya-Flux converter (its linear1 sizes are FLUX.1's, so double blocks and CLIP only)."""
    pipe = make_dit("flux")
    torch.manual_seed(4)
    config = bl.LoraConfig(r=4, alpha=8.0, target_modules=DOUBLE_BLOCK_LINEARS, init_weights=False)
    pipe.transformer = bl.get_peft_model(pipe.transformer, config).eval()
    pipe.text_encoder = bl.get_peft_model(
        pipe.text_encoder, bl.LoraConfig(r=2, target_modules="all-linear", init_weights=False)
    ).eval()
    live = dit_outputs(pipe, "flux")
    save_adapter(pipe, tmp_path / "kohya.safetensors")
    assert "lora_unet_double_blocks_1_txt_attn_qkv" in module_keys(tmp_path / "kohya.safetensors")
    theirs = make_dit("flux")
    theirs.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    assert_close(dit_outputs(theirs, "flux"), live, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_live_strength_removal_and_merging(kind: str, tmp_path) -> None:
    pipe = make_dit(kind)
    pristine = copy.deepcopy(pipe.transformer.state_dict())
    base = dit_outputs(pipe, kind)
    by_key = write_file(pipe, kind, "mixed", tmp_path / "mixed.safetensors")
    handle = load_adapter(pipe, tmp_path / "mixed.safetensors", multiplier=0.5, adapter_name="style")
    assert list_adapters(pipe) == ["style"]
    assert_close(dit_outputs(pipe, kind), reference_outputs(kind, by_key, 0.5))
    handle.set_multiplier(-1.0)
    assert_close(dit_outputs(pipe, kind), reference_outputs(kind, by_key, -1.0))
    handle.remove()
    assert adapter_layer_count(pipe, kind) == 0 and list_adapters(pipe) == []
    assert all(torch.equal(v, pristine[k]) for k, v in pipe.transformer.state_dict().items())
    assert_close(dit_outputs(pipe, kind), base, rtol=0, atol=0)

    merged = load_adapter(pipe, tmp_path / "mixed.safetensors", merge=True)
    assert merged.merged and adapter_layer_count(pipe, kind) == 0
    assert_close(dit_outputs(pipe, kind), reference_outputs(kind, by_key, 1.0))
    image = pipe("a cat", num_inference_steps=1, height=32, width=32, output_type="np", max_sequence_length=16).images
    assert image.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_unmatched_keys_are_named_and_failed_loads_change_nothing(kind: str, tmp_path) -> None:
    pipe = make_dit(kind)
    base = dit_outputs(pipe, kind)
    write_file(pipe, kind, "lora", tmp_path / "a.safetensors")
    tensors = load_file(str(tmp_path / "a.safetensors"))
    block = "double_blocks_7_img_attn_qkv" if kind == "flux" else "joint_blocks_7_x_block_attn_qkv"
    tensors[f"lora_unet_{block}.lora_down.weight"] = torch.ones(2, H)
    tensors[f"lora_unet_{block}.lora_up.weight"] = torch.ones(3 * H, 2)
    tensors["lora_te4_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.ones(2, 64)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    with pytest.raises(FormatError, match=rf"2 module key.*lora_te4_encoder_block_0.*lora_unet_{block}"):
        load_adapter(pipe, tmp_path / "extra.safetensors", strict=True)
    assert adapter_layer_count(pipe, kind) == 0
    with pytest.warns(UnmatchedKeysWarning, match=rf"lora_unet_{block}"):
        load_adapter(pipe, tmp_path / "extra.safetensors")
    assert adapter_layer_count(pipe, kind) > 0
    bl.unload_adapter(pipe)

    assert_close(dit_outputs(pipe, kind), base, rtol=0, atol=0)

    # a fused qkv LoKr splits exactly when W2's row blocks fall inside q, k and v, and is refused otherwise
    key = next(k for k in KEYS[kind] if k.endswith("qkv"))
    bad = {k: v for k, v in tensors.items() if not k.startswith((f"lora_unet_{block}.", "lora_te4", f"{key}.lora_"))}
    bad[f"{key}.lokr_w1"], bad[f"{key}.lokr_w2"] = torch.ones(3, 4), torch.ones(16, 4)  # 48 rows in blocks of 16
    save_file(bad, str(tmp_path / "exact.safetensors"))
    load_adapter(pipe, tmp_path / "exact.safetensors", strict=True)
    bl.unload_adapter(pipe)
    bad[f"{key}.lokr_w1"], bad[f"{key}.lokr_w2"] = torch.ones(2, 4), torch.ones(24, 4)  # blocks of 24: cut at 16
    save_file(bad, str(tmp_path / "straddles.safetensors"))
    for merge in (False, True):
        with pytest.raises(FormatError, match=rf"straddles.safetensors: {key}: LoKr.*W2's 24 rows.*row 16"):
            load_adapter(pipe, tmp_path / "straddles.safetensors", merge=merge)
        assert adapter_layer_count(pipe, kind) == 0
        assert_close(dit_outputs(pipe, kind), base, rtol=0, atol=0)


def test_onetrainer_names_read_as_the_same_adapter(tmp_path) -> None:
    """OneTrainer's ``lora_transformer_<diffusers path>`` keys, and Flux's T5 as ``lora_te2_``."""
    pipe = make_dit("flux")
    _wrap(pipe, "flux", "loha")
    live = dit_outputs(pipe, "flux")
    save_adapter(pipe, tmp_path / "lycoris.safetensors", names="lycoris")
    renamed = {}
    for key, tensor in load_file(str(tmp_path / "lycoris.safetensors")).items():
        key = key.replace("lycoris_", "lora_transformer_", 1) if key.startswith("lycoris_") else key
        renamed[key.replace("lora_te3_", "lora_te2_", 1)] = tensor
    assert any(k.startswith("lora_te2_encoder_block_") for k in renamed)
    save_file(renamed, str(tmp_path / "onetrainer.safetensors"))
    fresh = make_dit("flux")
    load_adapter(fresh, tmp_path / "onetrainer.safetensors", strict=True)
    assert_close(dit_outputs(fresh, "flux"), live)
