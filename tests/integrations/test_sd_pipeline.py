"""Adapters on diffusers Stable Diffusion pipelines: every algorithm from one file, live and merged, equal to
what a UI computes; canonical names on save; diffusers reads our LoRA files; merged pipelines save."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file

import beyondlora as bl
from beyondlora.errors import FormatError
from beyondlora.integrations.diffusers import (
    UnmatchedKeysWarning,
    list_adapters,
    load_adapter,
    save_adapter,
    set_adapters,
    set_multiplier,
    unload_adapter,
)
from helpers.sd_helpers import (
    adapter_layer_count,
    apply_like_a_ui,
    assert_changed,
    assert_outputs_close,
    build_file,
    make_pipeline,
    part_outputs,
)

# file key → (pipeline part, diffusers module name, what to write); keys written by hand, as UIs expect them
SD_ENTRIES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (
        "unet",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        {"algo": "lora", "r": 4, "alpha": 2.0},
    ),
    "lora_unet_conv_in": ("unet", "conv_in", {"algo": "lora", "r": 2, "alpha": 1.0, "tucker": True}),
    "lora_unet_down_blocks_0_downsamplers_0_conv": ("unet", "down_blocks.0.downsamplers.0.conv", {"algo": "lora"}),
    "lora_unet_down_blocks_1_resnets_0_conv1": ("unet", "down_blocks.1.resnets.0.conv1", {"algo": "loha", "alpha": 1}),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": (
        "unet",
        "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
        {"algo": "loha", "r": 3, "alpha": 1.5},
    ),
    "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k": (
        "unet",
        "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k",
        {"algo": "lokr", "a": 4, "c": 4, "r": 2, "alpha": 1.0},
    ),
    "lora_unet_down_blocks_2_resnets_1_conv2": (
        "unet",
        "down_blocks.2.resnets.1.conv2",
        {"algo": "lokr", "a": 4, "c": 4, "w2_full": True, "alpha": 7.0},  # UIs ignore alpha here
    ),
    "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_v": (
        "unet",
        "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_v",
        {"algo": "ia3"},
    ),
    "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_ff_net_2": (
        "unet",
        "up_blocks.2.attentions.0.transformer_blocks.0.ff.net.2",
        {"algo": "ia3", "on_input": True},
    ),
    "lora_unet_up_blocks_3_attentions_0_proj_out": ("unet", "up_blocks.3.attentions.0.proj_out", {"algo": "full"}),
    "lora_unet_mid_block_resnets_0_conv1": (
        "unet",
        "mid_block.resnets.0.conv1",
        {"algo": "oft", "b": 4, "constraint": 0.01, "rescaled": True},
    ),
    "lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_attn1_to_out_0": (
        "unet",
        "up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0",
        {"algo": "boft", "b": 2, "stages": 4, "rescaled": True},
    ),
    "lora_unet_up_blocks_1_resnets_0_conv1": (
        "unet",
        "up_blocks.1.resnets.0.conv1",
        {"algo": "boft", "b": 4, "stages": 2},
    ),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (
        "text_encoder",
        "encoder.layers.0.self_attn.q_proj",
        {"algo": "lora", "r": 4, "alpha": 8.0},
    ),
    "lora_te_text_model_encoder_layers_1_mlp_fc1": (
        "text_encoder",
        "encoder.layers.1.mlp.fc1",
        {"algo": "lokr", "a": 8, "c": 4, "r": 2, "alpha": 1.0, "w1_decomposed": True},
    ),
    "lora_te_text_model_encoder_layers_0_self_attn_k_proj": (
        "text_encoder",
        "encoder.layers.0.self_attn.k_proj",
        {"algo": "ia3"},
    ),
    "lora_te_text_model_encoder_layers_1_self_attn_out_proj": (
        "text_encoder",
        "encoder.layers.1.self_attn.out_proj",
        {"algo": "full"},
    ),
    "lora_te_text_model_encoder_layers_1_mlp_fc2": ("text_encoder", "encoder.layers.1.mlp.fc2", {"algo": "loha"}),
    # GLoRA: ΔW reads W, on a 16 → 32 3×3 conv and a text-encoder linear
    "lora_unet_down_blocks_2_resnets_0_conv1": ("unet", "down_blocks.2.resnets.0.conv1", {"algo": "glora", "alpha": 1}),
    "lora_te_text_model_encoder_layers_0_self_attn_v_proj": (
        "text_encoder",
        "encoder.layers.0.self_attn.v_proj",
        {"algo": "glora", "r": 3, "alpha": 6.0},
    ),
    "lora_te_text_model_encoder_layers_1_self_attn_v_proj": (
        "text_encoder",
        "encoder.layers.1.self_attn.v_proj",
        {"algo": "oft", "b": 8},
    ),
}
SDXL_ENTRIES = {
    "lora_unet_input_blocks_0_0": ("unet", "conv_in", {"algo": "lora", "r": 2, "tucker": True}),
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
        {"algo": "lora", "r": 4, "alpha": 2.0},
    ),
    "lora_unet_input_blocks_1_0_in_layers_2": ("unet", "down_blocks.0.resnets.0.conv1", {"algo": "loha"}),
    "lora_unet_input_blocks_3_0_op": ("unet", "down_blocks.0.downsamplers.0.conv", {"algo": "lora"}),
    "lora_unet_input_blocks_2_0_in_layers_2": ("unet", "down_blocks.0.resnets.1.conv1", {"algo": "glora"}),
    "lora_unet_middle_block_1_transformer_blocks_1_ff_net_2": (
        "unet",
        "mid_block.attentions.0.transformer_blocks.1.ff.net.2",
        {"algo": "loha", "r": 3, "alpha": 1.5},
    ),
    "lora_unet_output_blocks_5_1_transformer_blocks_0_attn2_to_k": (
        "unet",
        "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k",
        {"algo": "lokr", "a": 4, "c": 4, "r": 2, "alpha": 1.0},
    ),
    "lora_unet_input_blocks_7_0_out_layers_3": (
        "unet",
        "down_blocks.2.resnets.0.conv2",
        {"algo": "lokr", "a": 4, "c": 4, "w2_full": True},
    ),
    "lora_unet_input_blocks_8_1_transformer_blocks_1_attn1_to_v": (
        "unet",
        "down_blocks.2.attentions.1.transformer_blocks.1.attn1.to_v",
        {"algo": "ia3"},
    ),
    "lora_unet_output_blocks_2_2_conv": ("unet", "up_blocks.0.upsamplers.0.conv", {"algo": "lora", "r": 3}),
    "lora_unet_output_blocks_8_0_skip_connection": ("unet", "up_blocks.2.resnets.2.conv_shortcut", {"algo": "full"}),
    "lora_unet_label_emb_0_0": ("unet", "add_embedding.linear_1", {"algo": "ia3", "on_input": True}),
    "lora_unet_time_embed_2": ("unet", "time_embedding.linear_2", {"algo": "lora"}),
    "lora_unet_output_blocks_0_0_emb_layers_1": ("unet", "up_blocks.0.resnets.0.time_emb_proj", {"algo": "lora"}),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (
        "text_encoder",
        "encoder.layers.0.self_attn.q_proj",
        {"algo": "lora", "r": 4},
    ),
    "lora_te1_text_model_encoder_layers_1_mlp_fc1": (
        "text_encoder",
        "encoder.layers.1.mlp.fc1",
        {"algo": "lokr", "a": 8, "c": 4, "r": 2, "w1_decomposed": True},
    ),
    "lora_te2_text_model_encoder_layers_0_self_attn_k_proj": (
        "text_encoder_2",
        "text_model.encoder.layers.0.self_attn.k_proj",
        {"algo": "ia3"},
    ),
    "lora_te2_text_model_encoder_layers_1_mlp_fc2": (
        "text_encoder_2",
        "text_model.encoder.layers.1.mlp.fc2",
        {"algo": "loha"},
    ),
    "lora_te2_text_projection": ("text_encoder_2", "text_projection", {"algo": "lora", "r": 2}),
}
ENTRIES = {"sd": SD_ENTRIES, "sdxl": SDXL_ENTRIES}


def _write(pipe, kind: str, path, seed: int = 0, entries: dict | None = None):
    tensors, by_key = build_file(pipe, entries or ENTRIES[kind], seed)
    save_file(tensors, str(path))
    return by_key


def _ui_expected(kind: str, by_key: dict, multiplier: float) -> dict:
    reference = make_pipeline(kind)
    apply_like_a_ui(reference, ENTRIES[kind], by_key, multiplier)
    return part_outputs(reference, kind)


@pytest.mark.parametrize("merge", [False, True], ids=["live", "merged"])
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_mixed_file_matches_the_ui_formula(kind: str, merge: bool, tmp_path) -> None:
    pipe = make_pipeline(kind)
    base = part_outputs(pipe, kind)
    by_key = _write(pipe, kind, tmp_path / "mixed.safetensors")
    expected = _ui_expected(kind, by_key, 0.7)
    assert_changed(expected, base, list(expected))
    handle = load_adapter(pipe, tmp_path / "mixed.safetensors", multiplier=0.7, merge=merge)
    assert_outputs_close(part_outputs(pipe, kind), expected)
    assert handle.merged == merge
    assert adapter_layer_count(pipe) == (0 if merge else len(ENTRIES[kind]))
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"
    # the pipeline itself runs too (SDXL's reads add_embedding.linear_1.in_features through the adapter layer)
    image = pipe("a cat", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_live_adapters_stack_change_strength_and_remove(tmp_path) -> None:
    pipe = make_pipeline("sd")
    pristine = copy.deepcopy(pipe.unet.state_dict())
    base = part_outputs(pipe, "sd")
    first = _write(pipe, "sd", tmp_path / "a.safetensors", seed=0)
    # (IA)³ twice on one layer is W(1 + a + b) for us and W(1 + a)(1 + b) in a UI's sequential patching; GLoRA
    # and rotations likewise read the base W in each of our adapters, the already patched W in a UI's second file
    additive = {k: v for k, v in SD_ENTRIES.items() if v[2]["algo"] not in ("ia3", "glora", "oft", "boft")}
    second = _write(pipe, "sd", tmp_path / "b.safetensors", seed=1, entries=additive)
    a = load_adapter(pipe, tmp_path / "a.safetensors", multiplier=0.7, adapter_name="a")
    load_adapter(pipe, tmp_path / "b.safetensors", multiplier=-0.4, adapter_name="b")
    assert list_adapters(pipe) == ["a", "b"]
    reference = make_pipeline("sd")
    apply_like_a_ui(reference, SD_ENTRIES, first, 0.7)
    apply_like_a_ui(reference, additive, second, -0.4)
    assert_outputs_close(part_outputs(pipe, "sd"), part_outputs(reference, "sd"))

    a.set_multiplier(0.2)
    set_multiplier(pipe, 0.0, "b")
    assert_outputs_close(part_outputs(pipe, "sd"), _ui_expected("sd", first, 0.2))
    set_adapters(pipe, ["b"])  # "a" stays loaded but off, "b" at strength 0
    assert_outputs_close(part_outputs(pipe, "sd"), base)
    with pytest.raises(ValueError, match="already loaded"):
        load_adapter(pipe, tmp_path / "a.safetensors", adapter_name="b")

    a.remove()
    assert list_adapters(pipe) == ["b"]
    unload_adapter(pipe)
    assert adapter_layer_count(pipe) == 0 and list_adapters(pipe) == []
    assert all(torch.equal(v, pristine[k]) for k, v in pipe.unet.state_dict().items())
    assert_outputs_close(part_outputs(pipe, "sd"), base, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no adapter named"):
        a.set_multiplier(1.0)


def test_merging_a_live_adapter_and_saving_the_merged_pipeline(tmp_path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = make_pipeline("sd")
    by_key = _write(pipe, "sd", tmp_path / "a.safetensors")
    handle = load_adapter(pipe, tmp_path / "a.safetensors", multiplier=0.7)
    handle.merge()
    assert adapter_layer_count(pipe) == 0 and handle.merged
    expected = _ui_expected("sd", by_key, 0.7)
    assert_outputs_close(part_outputs(pipe, "sd"), expected)
    pipe.save_pretrained(tmp_path / "merged")
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path / "merged", local_files_only=True)
    assert_outputs_close(part_outputs(reloaded, "sd"), expected)


def _wrap_parts(pipe, kind: str, lora_only: bool = False) -> None:
    """``pipe.<part> = get_peft_model(pipe.<part>, config)`` with random (non-identity) adapters."""
    torch.manual_seed(3)
    unet_targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    conv_targets = ["conv1", "conv2", "conv_shortcut", "conv", "conv_in", "conv_out", "time_emb_proj"]
    text_targets = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    if lora_only:
        unet_config = bl.LoraConfig(r=4, alpha=2.0, target_modules=unet_targets + conv_targets, init_weights=False)
        text_config = bl.LoraConfig(r=2, alpha=4.0, target_modules=text_targets, init_weights=False)
    else:
        unet_config = bl.LoKrConfig(r=2, target_modules=unet_targets + conv_targets, init_weights=False)
        text_config = bl.LoHaConfig(r=2, alpha=1.0, target_modules=text_targets, init_weights=False)
    pipe.unet = bl.get_peft_model(pipe.unet, unet_config)
    pipe.text_encoder = bl.get_peft_model(pipe.text_encoder, text_config)
    if kind == "sdxl":
        pipe.text_encoder_2 = bl.get_peft_model(pipe.text_encoder_2, copy.deepcopy(text_config))
    for part in ("unet", "text_encoder", "text_encoder_2"):
        if getattr(pipe, part, None) is not None:
            getattr(pipe, part).eval()


EXPECTED_KEYS = {
    "sd": [
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_up_blocks_0_upsamplers_0_conv",
        "lora_unet_mid_block_resnets_1_time_emb_proj",
        "lora_te_text_model_encoder_layers_1_mlp_fc2",
    ],
    "sdxl": [
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "lora_unet_input_blocks_3_0_op",
        "lora_unet_output_blocks_2_2_conv",
        "lora_unet_middle_block_2_out_layers_3",
        "lora_unet_input_blocks_0_0",
        "lora_unet_out_2",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_1_mlp_fc1",
    ],
}


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_save_adapter_writes_canonical_names_that_read_back_exactly(kind: str, tmp_path) -> None:
    pipe = make_pipeline(kind)
    _wrap_parts(pipe, kind)
    expected = part_outputs(pipe, kind)
    save_adapter(pipe, tmp_path / "a.safetensors")
    tensors = load_file(str(tmp_path / "a.safetensors"))
    modules = {key.partition(".")[0] for key in tensors}
    prefixes = {"sd": ("lora_unet_", "lora_te_text_model_"), "sdxl": ("lora_unet_", "lora_te1_", "lora_te2_")}[kind]
    assert all(m.startswith(prefixes) for m in modules)
    assert set(EXPECTED_KEYS[kind]) <= modules
    if kind == "sdxl":
        assert not any("down_blocks" in m or "up_blocks" in m or "mid_block" in m for m in modules)
        assert all(m.startswith(("lora_unet_", "lora_te1_text_model_", "lora_te2_text_model_")) for m in modules)

    fresh = make_pipeline(kind)
    load_adapter(fresh, tmp_path / "a.safetensors")
    assert_outputs_close(part_outputs(fresh, kind), expected, rtol=1e-5, atol=1e-6)
    image = fresh("a cat", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    save_adapter(fresh, tmp_path / "again.safetensors")
    again = load_file(str(tmp_path / "again.safetensors"))
    assert again.keys() == tensors.keys()
    for key, tensor in tensors.items():
        torch.testing.assert_close(again[key], tensor, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_diffusers_loads_our_lora_files_to_the_same_outputs(kind: str, tmp_path) -> None:
    pipe = make_pipeline(kind)
    base = part_outputs(pipe, kind)
    _wrap_parts(pipe, kind, lora_only=True)
    ours = part_outputs(pipe, kind)
    assert_changed(ours, base, list(ours))
    save_adapter(pipe, tmp_path / "lora.safetensors")
    theirs = make_pipeline(kind)
    theirs.load_lora_weights(str(tmp_path / "lora.safetensors"))
    assert_outputs_close(part_outputs(theirs, kind), ours, rtol=1e-4, atol=1e-5)

    # and back: diffusers' own LoRA file (with its adapter metadata) loads through load_adapter
    from peft.utils import get_peft_model_state_dict

    layers, metadata = {}, {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(theirs, part, None)
        if module is not None:
            layers[f"{part}_lora_layers"] = get_peft_model_state_dict(module, adapter_name="default_0")
            metadata[f"{part}_lora_adapter_metadata"] = module.peft_config["default_0"].to_dict()
    type(theirs).save_lora_weights(tmp_path / "diffusers", **layers, **metadata)
    again = make_pipeline(kind)
    load_adapter(again, tmp_path / "diffusers" / "pytorch_lora_weights.safetensors", strict=True)
    assert_outputs_close(part_outputs(again, kind), ours, rtol=1e-4, atol=1e-5)


def test_unmatched_keys_are_named_and_strict_mode_refuses(tmp_path) -> None:
    pipe = make_pipeline("sd")
    tensors, _ = build_file(pipe, SD_ENTRIES)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.weight"] = torch.ones(16)
    tensors["lora_te2_text_model_encoder_layers_0_mlp_fc1.weight"] = torch.ones(64)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(FormatError, match="lora_te2_text_model_encoder_layers_0_mlp_fc1.*lora_unet_down_blocks_9"):
        load_adapter(pipe, tmp_path / "extra.safetensors", strict=True)
    assert adapter_layer_count(pipe) == 0
    with pytest.warns(UnmatchedKeysWarning, match="2 module key.*lora_te2_text_model_encoder_layers_0_mlp_fc1"):
        load_adapter(pipe, tmp_path / "extra.safetensors")
    assert adapter_layer_count(pipe) == len(SD_ENTRIES)
    unload_adapter(pipe)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_a_bad_tensor_in_any_part_changes_nothing(tmp_path) -> None:
    pipe = make_pipeline("sd")
    tensors, _ = build_file(pipe, SD_ENTRIES)
    tensors["lora_te_text_model_encoder_layers_1_mlp_fc2.hada_w1_b"] = torch.ones(2, 7)
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    before = copy.deepcopy(pipe.unet.state_dict())
    for merge in (False, True):
        with pytest.raises(FormatError, match=r"lora_te_text_model_encoder_layers_1_mlp_fc2.*hada_w1_b"):
            load_adapter(pipe, tmp_path / "bad.safetensors", merge=merge)
        assert adapter_layer_count(pipe) == 0
        assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    with pytest.raises(FormatError, match="match no module"):
        load_adapter(pipe.vae, tmp_path / "bad.safetensors")


def test_peft_folders_and_single_modules(tmp_path) -> None:
    pipe = make_pipeline("sd")
    base = part_outputs(pipe, "sd")
    wrapped = make_pipeline("sd")
    _wrap_parts(wrapped, "sd", lora_only=True)
    expected = part_outputs(wrapped, "sd")
    wrapped.unet.save_pretrained(tmp_path / "folder" / "unet")
    wrapped.text_encoder.save_pretrained(tmp_path / "folder" / "text_encoder")
    load_adapter(pipe, tmp_path / "folder")  # one PEFT subfolder per part
    assert_outputs_close(part_outputs(pipe, "sd"), expected)
    unload_adapter(pipe)
    load_adapter(pipe, tmp_path / "folder" / "unet")  # a PEFT folder that fits the UNet only
    outputs = part_outputs(pipe, "sd")
    assert_outputs_close({"text_encoder": outputs["text_encoder"]}, {"text_encoder": base["text_encoder"]})
    unload_adapter(pipe)

    save_adapter(wrapped, tmp_path / "a.safetensors")
    unet = make_pipeline("sd").unet
    with pytest.warns(UnmatchedKeysWarning, match="lora_te_text_model"):
        load_adapter(unet, tmp_path / "a.safetensors")  # a plain module: the UNet's keys only
    assert list_adapters(unet) == ["default"]
    assert sum(type(m).__name__ == "AdapterLayer" for m in unet.modules()) > 0


def test_a_failure_while_attaching_is_rolled_back(tmp_path, monkeypatch) -> None:
    pipe = make_pipeline("sd")
    base = part_outputs(pipe, "sd")
    _write(pipe, "sd", tmp_path / "a.safetensors")
    original = bl.PeftModel.add_adapter

    def fail_on_the_text_encoder(self, *args, **kwargs):  # the UNet (planned first) is attached by then
        if type(self.base_model).__name__ == "CLIPTextModel":
            raise RuntimeError("attach failed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(bl.PeftModel, "add_adapter", fail_on_the_text_encoder)
    with pytest.raises(RuntimeError, match="attach failed"):
        load_adapter(pipe, tmp_path / "a.safetensors")
    assert adapter_layer_count(pipe) == 0 and list_adapters(pipe) == []
    assert_outputs_close(part_outputs(pipe, "sd"), base, rtol=0, atol=0)
