"""``--network_module beyondlora.kohya``: the interface driven exactly as sd-scripts' train_network.py drives it
(with the tiny pipelines' parts, since sd-scripts itself needs real checkpoints)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from beyondlora.integrations.diffusers import load_adapter
from beyondlora.integrations.kohya_args import NetworkArgs
from helpers.sd_helpers import assert_outputs_close, make_pipeline, part_outputs

network_module = importlib.import_module("beyondlora.kohya")  # what train_network.py does with --network_module


def _text_encoders(pipe) -> list:
    return [pipe.text_encoder] + ([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) is not None else [])


def _loss(pipe, kind: str, text_encoders: list, unet, train_text_encoder: bool) -> torch.Tensor:
    """One sd-scripts style diffusion loss (latents as cached by ``--cache_latents``: random here)."""
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    ids = pipe.tokenizer(["a cat", "a dog"], padding="max_length", return_tensors="pt").input_ids
    with torch.set_grad_enabled(train_text_encoder):
        states = [te(ids, output_hidden_states=True) for te in text_encoders]
    cond = torch.cat([s.hidden_states[-2] for s in states], dim=-1)
    kwargs = {}
    if kind == "sdxl":
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).repeat(2, 1)
        kwargs["added_cond_kwargs"] = {"text_embeds": states[1].text_embeds, "time_ids": time_ids}
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.tensor([100, 700])
    noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, cond, **kwargs).sample
    return F.mse_loss(prediction.float(), noise)


def train_like_sd_scripts(
    pipe, kind: str, net_kwargs: dict, dim=4, alpha=2.0, steps=1, train_text_encoder=True, checkpointing=False
):
    """create_network → apply_to → prepare_optimizer_params → freeze and cast the base → prepare_grad_etc →
    on_epoch_start → steps (on_step_start, backward, clip, step, max-norm) — train_network.py's order."""
    text_encoders, unet, vae = _text_encoders(pipe), pipe.unet, pipe.vae
    text_encoder = text_encoders if len(text_encoders) > 1 else text_encoders[0]
    net_kwargs = dict(net_kwargs)
    net_kwargs.setdefault("dropout", None)  # "workaround for LyCORIS": args.network_dropout, None by default
    network = network_module.create_network(1.0, dim, alpha, vae, text_encoder, unet, neuron_dropout=None, **net_kwargs)
    network.apply_to(text_encoder, unet, train_text_encoder, True)
    if checkpointing:
        unet.enable_gradient_checkpointing()
        network.enable_gradient_checkpointing()
    params, descriptions = network.prepare_optimizer_params(5e-3, 1e-2, 1e-2)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    unet.requires_grad_(False)
    unet.to(dtype=torch.float32)
    for t_enc in text_encoders:
        t_enc.requires_grad_(False)
    (unet.train if checkpointing else unet.eval)()
    for t_enc in text_encoders:
        t_enc.eval()
    network.prepare_grad_etc(text_encoder, unet)
    vae.requires_grad_(False)
    network.on_epoch_start(text_encoder, unet)
    losses = []
    for _ in range(steps):
        network.on_step_start(text_encoder, unet)
        loss = _loss(pipe, kind, text_encoders, unet, train_text_encoder)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        network.apply_max_norm_regularization(10.0, "cpu")
        losses.append(loss.item())
    return network, descriptions, losses


MIXED_PRESET = """
unet_target_module = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
unet_target_name = ["conv_in", "conv_out"]
text_encoder_target_module = ["CLIPAttention", "CLIPMLP"]
[module_algo_map.ResnetBlock2D]
algo = "loha"
use_tucker = "true"
conv_dim = 2
[module_algo_map.FeedForward]
algo = "ia3"
[module_algo_map.CLIPMLP]
algo = "dylora"
block_size = 2
[module_algo_map.CLIPAttention]
algo = "lora"
dora_wd = true
dropout = 0.1
[name_algo_map."proj_out"]
algo = "full"
[name_algo_map."ff.net.2"]
algo = "ia3"
on_input = "yes"
"""
CASES = {
    "locon": {"algo": "locon", "conv_dim": "2", "conv_alpha": "1"},
    "lokr-scalar-dropouts-norms": {
        "algo": "lokr",
        "factor": "4",
        "decompose_both": "yes",
        "use_scalar": "1",
        "rank_dropout": "0.1",
        "module_dropout": "0.1",
        "train_norm": "on",
        "rs_lora": "true",
    },
    "glora-tucker-rslora-dropouts": {
        "algo": "glora",
        "conv_dim": "2",
        "conv_alpha": "1",
        "use_tucker": "true",
        "rs_lora": "true",
        "rank_dropout": "0.1",
        "module_dropout": "0.1",
    },
    # every algorithm in one network: LoKr (full factors at dim 16) by default, the others per block
    "mixed-preset": {"algo": "lokr", "factor": "4", "preset": MIXED_PRESET},
    "diag-oft": {"algo": "diag-oft", "constraint": "0.01", "rescaled": "true"},
    "boft": {"algo": "boft", "constraint": "1e-3", "conv_dim": "2"},
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_a_training_step_saves_a_file_that_loads_back(case: str, tmp_path) -> None:
    pipe = make_pipeline("sd")
    base = part_outputs(pipe, "sd")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    net_kwargs = dict(CASES[case])
    if "preset" in net_kwargs:
        (tmp_path / "preset.toml").write_text(net_kwargs["preset"])
        net_kwargs["preset"] = str(tmp_path / "preset.toml")
    dim = 16 if case == "mixed-preset" else 4
    network, _, losses = train_like_sd_scripts(pipe, "sd", net_kwargs, dim=dim, checkpointing=case == "locon")
    algorithms = {a.algorithm for a in network.adapters.values()}
    if case == "mixed-preset":
        assert algorithms == {"lora", "loha", "lokr", "ia3", "dylora", "full"}
        assert any(a.dora_scale is not None for a in network.adapters.values())
        assert any(a.algorithm == "lokr" and a.w1_is_full and a.w2_is_full for a in network.adapters.values())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert network.get_trainable_params() and all(p.requires_grad for p in network.get_trainable_params())
    network.eval()
    trained = part_outputs(pipe, "sd")
    assert (trained["unet"] - base["unet"]).abs().max() > 1e-5, "the step changed nothing"
    for key, value in pipe.unet.state_dict().items():
        if "base_layer" not in key and "adapters" not in key:
            assert torch.equal(value, before[key]), key
    metadata = {"ss_network_module": "beyondlora.kohya", "ss_network_dim": "4", "ss_output_name": "test"}
    path = tmp_path / "net.safetensors"
    network.save_weights(str(path), torch.float32, metadata)
    keys = {k.partition(".")[0] for k in load_file(str(path))}
    assert keys and all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in keys)
    with safe_open(str(path), "pt") as handle:
        header = handle.metadata()
    assert header["ss_output_name"] == "test" and "beyondlora_modules" in header

    fresh = make_pipeline("sd")
    load_adapter(fresh, path)  # what a UI-equivalent loader gives
    assert_outputs_close(part_outputs(fresh, "sd"), trained, rtol=1e-5, atol=1e-6)
    other = make_pipeline("sd")
    loaded, weights = network_module.create_network_from_weights(1.0, str(path), None, other.text_encoder, other.unet)
    loaded.apply_to(other.text_encoder, other.unet, True, True)
    loaded.eval()
    assert set(weights) == set(load_file(str(path)))
    assert_outputs_close(part_outputs(other, "sd"), trained, rtol=1e-5, atol=1e-6)


def test_sdxl_with_two_text_encoders_writes_te1_te2_and_sgm_names(tmp_path) -> None:
    pipe = make_pipeline("sdxl")
    network, descriptions, _ = train_like_sd_scripts(pipe, "sdxl", {"algo": "lokr", "conv_dim": "2", "factor": "4"})
    assert descriptions == ["textencoder", "textencoder2", "unet"]
    network.eval()
    expected = part_outputs(pipe, "sdxl")
    network.save_weights(str(tmp_path / "xl.safetensors"), None, {})
    keys = {k.partition(".")[0] for k in load_file(str(tmp_path / "xl.safetensors"))}
    assert {k.split("_")[1] for k in keys} == {"unet", "te1", "te2"}
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in keys
    assert "lora_unet_output_blocks_2_2_conv" in keys and "lora_unet_input_blocks_0_0" in keys
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)
    fresh = make_pipeline("sdxl")
    load_adapter(fresh, tmp_path / "xl.safetensors")
    assert_outputs_close(part_outputs(fresh, "sdxl"), expected, rtol=1e-5, atol=1e-6)


def test_unet_only_training_and_resuming_with_load_weights(tmp_path) -> None:
    pipe = make_pipeline("sd")
    network, descriptions, _ = train_like_sd_scripts(pipe, "sd", {"algo": "loha"}, train_text_encoder=False)
    assert descriptions == ["unet"]
    network.eval()
    expected = part_outputs(pipe, "sd")
    network.save_weights(str(tmp_path / "unet.safetensors"), torch.float32, None)
    assert all(k.startswith("lora_unet_") for k in load_file(str(tmp_path / "unet.safetensors")))

    resumed = make_pipeline("sd")  # --network_weights: create, apply, then load_weights
    network = network_module.create_network(1.0, 4, 2.0, resumed.vae, resumed.text_encoder, resumed.unet, algo="loha")
    network.apply_to(resumed.text_encoder, resumed.unet, False, True)
    assert network.load_weights(str(tmp_path / "unet.safetensors")) == {}
    network.eval()
    assert_outputs_close(part_outputs(resumed, "sd"), expected, rtol=1e-5, atol=1e-6)

    generated = make_pipeline("sd")  # sd-scripts' image generation: apply, then load_state_dict(weights, False)
    net, weights = network_module.create_network_from_weights(
        0.5, str(tmp_path / "unet.safetensors"), None, generated.text_encoder, generated.unet, for_inference=True
    )
    net.apply_to(generated.text_encoder, generated.unet)
    net.load_state_dict(weights, False)
    net.set_multiplier(1.0)
    assert_outputs_close(part_outputs(generated, "sd"), expected, rtol=1e-5, atol=1e-6)

    merged = make_pipeline("sd")  # --base_weights: merge_to
    net, weights = network_module.create_network_from_weights(
        1.0, str(tmp_path / "unet.safetensors"), None, merged.text_encoder, merged.unet, for_inference=True
    )
    assert net.is_mergeable()
    net.merge_to(merged.text_encoder, merged.unet, weights, torch.float32, "cpu")
    assert not any(type(m).__name__ == "AdapterLayer" for m in merged.unet.modules())
    assert_outputs_close(part_outputs(merged, "sd"), expected, rtol=1e-4, atol=1e-5)


def test_network_args_are_typed_and_unknown_ones_are_errors() -> None:
    for text in ("false", "0", "no", "off", "False", "NO"):
        assert NetworkArgs.parse({"use_tucker": text}).use_tucker is False
    for text in ("true", "1", "yes", "on", "True"):
        assert NetworkArgs.parse({"use_tucker": text}).use_tucker is True
    parsed = NetworkArgs.parse({"conv_dim": "8", "conv_alpha": "0.5", "factor": "-1", "algo": "LoCon", "dropout": None})
    assert (parsed.conv_dim, parsed.conv_alpha, parsed.factor, parsed.algo, parsed.dropout) == (8, 0.5, -1, "lora", 0.0)
    pipe = make_pipeline("sd")
    create = network_module.create_network
    with pytest.raises(ValueError, match="unknown network arg 'conv_rank'"):
        create(1.0, 4, 1.0, pipe.vae, pipe.text_encoder, pipe.unet, conv_rank="4")
    with pytest.raises(ValueError, match="conv_dim='two' is not an integer"):
        create(1.0, 4, 1.0, pipe.vae, pipe.text_encoder, pipe.unet, conv_dim="two")
    with pytest.raises(ValueError, match="decompose_both='maybe' is not a boolean"):
        create(1.0, 4, 1.0, pipe.vae, pipe.text_encoder, pipe.unet, decompose_both="maybe")
    with pytest.raises(ValueError, match="algo='nope' is unknown"):
        create(1.0, 4, 1.0, pipe.vae, pipe.text_encoder, pipe.unet, algo="nope")
    with pytest.raises(ValueError, match="network arg constraint does not apply to algorithm lokr"):
        create(1.0, 4, 1.0, pipe.vae, pipe.text_encoder, pipe.unet, algo="lokr", constraint="0.01")
    with pytest.raises(ValueError, match="preset='everything'"):
        create(1.0, 4, 1.0, pipe.vae, pipe.text_encoder, pipe.unet, preset="everything")
    with pytest.raises(ValueError, match="unknown network arg 'colour'"):
        network_module.create_network_from_weights(1.0, None, None, None, pipe.unet, weights_sd={}, colour="1")


@pytest.mark.parametrize(
    "args, message",
    [
        ({"algo": "loha", "dropout": "0.1"}, "network arg dropout does not apply to algorithm loha"),
        ({"algo": "ia3", "dropout": "0.1"}, "network arg dropout does not apply to algorithm ia3"),
        ({"algo": "ia3", "dora_wd": "true"}, "network arg use_dora does not apply to algorithm ia3"),
        ({"algo": "full", "use_scalar": "true"}, r"use_scalar applies to loha, lokr, lora, dylora, not full"),
    ],
)
def test_network_args_an_algorithm_lacks_are_refused(args: dict[str, str], message: str) -> None:
    pipe = make_pipeline("sd")
    with pytest.raises(ValueError, match=message):
        network_module.create_network(1.0, 4, 1.0, pipe.vae, pipe.text_encoder, pipe.unet, **args)


def _layers(network, kind: str) -> set[str]:
    """Adapted module kinds: 'linear', 'conv3' (k×k conv), 'conv1' (pointwise), 'norm'."""
    kinds = set()
    for key in network.adapters:
        role = network.roles[key]
        module = next(p.module for p in network.planned[role] if network.naming[role].key(p.name) == key)
        name = type(module).__name__
        if name == "Conv2d":
            kinds.add("conv3" if module.kernel_size != (1, 1) else "conv1")
        else:
            kinds.add({"Linear": "linear"}.get(name, "norm"))
    return kinds


def test_dims_of_zero_presets_and_preset_files(tmp_path) -> None:
    pipe = make_pipeline("sd")
    parts = (pipe.vae, pipe.text_encoder, pipe.unet)
    assert _layers(network_module.create_network(1.0, 4, 1.0, *parts), "") == {"linear", "conv1", "conv3"}
    assert _layers(network_module.create_network(1.0, 4, 1.0, *parts, conv_dim="0"), "") == {"linear", "conv1"}
    assert _layers(network_module.create_network(1.0, 0, 1.0, *parts, conv_dim="4"), "") == {"conv3"}
    with pytest.warns(UserWarning, match="adapts no layer"):
        assert len(network_module.create_network(1.0, 0, 1.0, *parts, conv_dim="0").adapters) == 0
    assert _layers(network_module.create_network(1.0, 4, 1.0, *parts, train_norm="yes"), "") >= {"norm"}
    attn = network_module.create_network(1.0, 4, 1.0, *parts, preset="attn-only")
    leaves = {k.rsplit("_", 1)[-1] for k in attn.adapters}
    assert leaves == {"q", "k", "v", "0", "proj"}  # to_q/k/v, to_out.0; q/k/v/out_proj
    unet_only = network_module.create_network(1.0, 4, 1.0, *parts, preset="unet-only")
    assert unet_only.adapters and all(k.startswith("lora_unet_") for k in unet_only.adapters)

    preset = tmp_path / "preset.toml"
    preset.write_text(
        'unet_target_module = ["Transformer2DModel"]\n'
        "text_encoder_target_module = []\n"
        'exclude_name = ["mid_block.*"]\n'
        '[module_algo_map.FeedForward]\nalgo = "loha"\ndim = 2\n'
        '[name_algo_map."proj_in"]\nalgo = "ia3"\n'
    )
    network = network_module.create_network(1.0, 4, 1.0, *parts, preset=str(preset), algo="lokr")
    algorithms = {k: a.algorithm for k, a in network.adapters.items()}
    assert not any("mid_block" in k or "lora_te" in k for k in algorithms)
    assert {a for k, a in algorithms.items() if "_ff_net_" in k} == {"loha"}
    assert {a for k, a in algorithms.items() if k.endswith("proj_in")} == {"ia3"}
    assert {a for k, a in algorithms.items() if k.endswith("attn1_to_q")} == {"lokr"}
    preset.write_text('unet_target_modules = ["Transformer2DModel"]\n')
    with pytest.raises(ValueError, match="unknown key.*unet_target_modules"):
        network_module.create_network(1.0, 4, 1.0, *parts, preset=str(preset))


def test_loraplus_groups_max_norm_dtype_restoring_and_scalar_identity() -> None:
    pipe = make_pipeline("sd")
    base = part_outputs(pipe, "sd")
    parts = (pipe.vae, pipe.text_encoder, pipe.unet)
    network = network_module.create_network(
        1.0, 4, 4.0, *parts, algo="loha", use_scalar="true", loraplus_unet_lr_ratio="8", loraplus_lr_ratio="2"
    )
    network.apply_to(pipe.text_encoder, pipe.unet, True, True)
    network.eval()
    assert_outputs_close(part_outputs(pipe, "sd"), base, rtol=0, atol=1e-5)  # random factors, scalar 0: identity
    groups, descriptions = network.prepare_optimizer_params(1e-4, 1e-3, 1e-2)
    assert descriptions == ["textencoder", "textencoder plus", "unet", "unet plus"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-4, 2e-4, 1e-3, 8e-3])
    plus = {id(p) for g in groups if g is groups[1] or g is groups[3] for p in g["params"]}
    names = {n.rsplit(".", 1)[-1] for n, p in network.named_parameters() if id(p) in plus}
    assert names == {"hada_w1_a", "hada_w2_a"}

    with torch.no_grad():
        for adapter in network.adapters.values():
            adapter.scalar.fill_(50.0)
    scaled, mean, largest = network.apply_max_norm_regularization(0.5, "cpu")
    assert scaled == len(network.adapters) and largest == pytest.approx(0.5, rel=1e-4)
    for key, adapter in network.adapters.items():
        norm = adapter.delta_weight(network.hosts[key].base_weight()).norm()
        assert norm <= 0.5 * (1 + 1e-4)

    optimizer_params = [p for g in groups for p in g["params"]]
    pipe.unet.to(dtype=torch.bfloat16)  # what sd-scripts does to the base model after apply_to
    assert next(network.adapters.parameters()).dtype == torch.bfloat16
    network.prepare_grad_etc(pipe.text_encoder, pipe.unet)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in network.parameters())
    assert {id(p) for p in optimizer_params} == {id(p) for p in network.parameters()}
    out = part_outputs(pipe, "sd")["unet"]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_sd_scripts_metadata_and_unapply(tmp_path) -> None:
    pipe = make_pipeline("sd")
    base = part_outputs(pipe, "sd")
    network = network_module.create_network(1.0, 8, 4.0, None, pipe.text_encoder, pipe.unet, algo="lokr", factor="8")
    network.apply_to(pipe.text_encoder, pipe.unet, True, True)
    sd_scripts_metadata = {"ss_network_args": json.dumps({"algo": "lokr"})}
    network.save_weights(str(tmp_path / "n.safetensors"), torch.float16, sd_scripts_metadata)
    with safe_open(str(tmp_path / "n.safetensors"), "pt") as handle:
        header = handle.metadata()
        assert handle.get_tensor(next(k for k in handle.keys() if k.endswith(".alpha"))).dtype == torch.float32
        assert handle.get_tensor(next(k for k in handle.keys() if k.endswith(".lokr_w1"))).dtype == torch.float16
    assert header["ss_network_module"] == "beyondlora.kohya"
    assert json.loads(header["ss_network_args"]) == {"algo": "lokr"}
    network.save_weights(str(tmp_path / "n.pt"), None, None)
    assert set(torch.load(tmp_path / "n.pt", weights_only=True)) == set(load_file(str(tmp_path / "n.safetensors")))
    network.unapply()
    assert not any(type(m).__name__ == "AdapterLayer" for m in pipe.unet.modules())
    assert_outputs_close(part_outputs(pipe, "sd"), base, rtol=0, atol=0)


def test_max_norm_scales_an_ia3_that_scales_the_bias(tmp_path) -> None:
    """An (IA)³ of PEFT's meaning read from our file (its metadata records ``scale_bias``) changes its layers'
    biases too; max-norm regularization scales its vector (ΔW and Δb are linear in it) instead of failing."""
    import beyondlora as bl

    pipe = make_pipeline("sd")
    pipe.unet = bl.get_peft_model(pipe.unet, bl.IA3Config(target_modules=["proj_in", "to_out.0"], init_weights=False))
    path = tmp_path / "ia3.safetensors"
    with pytest.warns(UserWarning, match="scale_bias=True"):
        bl.save_adapter(pipe, path)
    other = make_pipeline("sd")
    network, _ = network_module.create_network_from_weights(1.0, str(path), None, other.text_encoder, other.unet)
    network.apply_to(other.text_encoder, other.unet, True, True)
    assert all(a.scales_layer_bias for a in network.adapters.values())
    scaled, _, largest = network.apply_max_norm_regularization(1e-3, "cpu")
    assert scaled == len(network.adapters) and largest == pytest.approx(1e-3, rel=1e-4)
    for key, adapter in network.adapters.items():
        assert adapter.delta_weight(network.hosts[key].base_weight()).norm() <= 1e-3 * (1 + 1e-4)
