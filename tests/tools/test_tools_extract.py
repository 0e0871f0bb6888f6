"""``beyondlora extract``: planted deltas are recovered to float32 rounding, unchanged layers skipped.

Every check rebuilds ΔW from the written file with the independent UI formula (tests/helpers/ui_formula.py) or
compares against an SVD / Kronecker construction done here in float64.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import beyondlora as bl
from beyondlora.cli import main
from beyondlora.formats.single_file import group_by_module
from helpers.reference import block_kron
from helpers.tool_cases import (
    low_rank,
    planted_model,
    save_pipeline,
    save_state,
    state_of,
    tiny_text_encoder,
    tiny_unet,
)
from helpers.ui_formula import ui_delta


def _canonical(name: str, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t() if name.endswith("embedding") else tensor


def _check_recovered(adapter_path, base, tuned, names, rtol=2e-5) -> dict[str, dict[str, torch.Tensor]]:
    """Every listed module's W + ΔW(file) equals the tuned weight (float32 rounding); others are absent."""
    grouped = group_by_module(load_file(adapter_path))
    assert set(grouped) == {f"lycoris_{n.replace('.', '_')}" for n in names}
    for name in names:
        params = grouped[f"lycoris_{name.replace('.', '_')}"]
        weight = _canonical(name, base[f"{name}.weight"]).double()
        delta, _ = ui_delta(params, weight)
        expected = _canonical(name, tuned[f"{name}.weight"]).double() - weight
        error = float((delta - expected).norm() / expected.norm())
        assert error < rtol, (name, error)
    return grouped


@pytest.fixture
def planted(tmp_path):
    base = state_of(planted_model())
    return base, tmp_path


def test_locon_recovers_low_rank_deltas_and_skips_unchanged(planted, capsys) -> None:
    base, tmp = planted
    g = torch.Generator().manual_seed(1)
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["lin.weight"] += low_rank(64, 48, 3, g)
    tuned["conv.weight"] += low_rank(32, 16 * 9, 2, g).reshape(32, 16, 3, 3)
    tuned["pw.weight"] += low_rank(32, 32, 4, g).reshape(32, 32, 1, 1)
    save_state(base, tmp / "base.safetensors"), save_state(tuned, tmp / "tuned.safetensors")
    code = main(
        ["extract", str(tmp / "base.safetensors"), str(tmp / "tuned.safetensors"), str(tmp / "a.safetensors")]
        + ["--linear-dim", "4", "--conv-dim", "2"]
    )
    assert code == 0
    grouped = _check_recovered(tmp / "a.safetensors", base, tuned, ["lin", "conv", "pw"])
    # 1×1 convs count as linear (--linear-dim); k×k convs take --conv-dim
    assert {k: v["lora_down.weight"].shape[0] for k, v in grouped.items()} == {
        "lycoris_lin": 4,
        "lycoris_conv": 2,
        "lycoris_pw": 4,
    }
    assert grouped["lycoris_conv"]["lora_up.weight"].shape == (32, 2, 1, 1)
    assert all(float(p["alpha"]) == p["lora_down.weight"].shape[0] for p in grouped.values())  # scale 1
    out = capsys.readouterr().out
    assert "extracted 3 layer(s)" in out and "3 unchanged layer(s) skipped" in out
    # the file loads back onto the real model (our reader, metadata and all) to the tuned outputs
    model = planted_model()
    wrapped = bl.PeftModel.from_pretrained(model, str(tmp / "a.safetensors"))
    reference = planted_model()
    reference.load_state_dict({k: v for k, v in tuned.items() if k != "step_count"})
    x = torch.randn(5, 48)
    torch.testing.assert_close(wrapped.lin(x), reference.lin(x), rtol=1e-5, atol=1e-5)


def test_randomized_svd_path_is_exact_for_low_rank(tmp_path) -> None:
    g = torch.Generator().manual_seed(2)
    base = {"big.weight": torch.randn(256, 320, generator=g), "big.bias": torch.randn(256, generator=g)}
    tuned = {"big.weight": base["big.weight"] + low_rank(256, 320, 5, g), "big.bias": base["big.bias"]}
    save_state(base, tmp_path / "b.safetensors"), save_state(tuned, tmp_path / "t.safetensors")
    paths = [str(tmp_path / name) for name in ("b.safetensors", "t.safetensors", "a.safetensors")]
    assert main(["extract", *paths, "--linear-dim", "6"]) == 0
    _check_recovered(tmp_path / "a.safetensors", base, tuned, ["big"])


def test_lokr_recovers_kronecker_deltas(planted) -> None:
    base, tmp = planted
    g = torch.Generator().manual_seed(3)
    tuned = {k: v.clone() for k, v in base.items()}
    # out 64 = 8·8, in 48 = 6·8; conv out 32 = 4·8, in 16 = 4·4 (LyCORIS factorization, factor -1)
    tuned["lin.weight"] += block_kron(torch.randn(8, 6, generator=g), 0.3 * torch.randn(8, 8, generator=g))
    tuned["conv.weight"] += block_kron(torch.randn(4, 4, generator=g), 0.3 * torch.randn(8, 4, 3, 3, generator=g))
    save_state(base, tmp / "base.safetensors"), save_state(tuned, tmp / "tuned.safetensors")
    args = ["extract", str(tmp / "base.safetensors"), str(tmp / "tuned.safetensors"), str(tmp / "k.safetensors")]
    assert main(args + ["--algo", "lokr"]) == 0
    grouped = _check_recovered(tmp / "k.safetensors", base, tuned, ["lin", "conv"])
    assert grouped["lycoris_lin"]["lokr_w1"].shape == (8, 6) and grouped["lycoris_lin"]["lokr_w2"].shape == (8, 8)
    assert grouped["lycoris_conv"]["lokr_w2"].shape == (8, 4, 3, 3)


def test_lokr_with_low_rank_w2_and_factor(planted) -> None:
    base, tmp = planted
    g = torch.Generator().manual_seed(4)
    tuned = {k: v.clone() for k, v in base.items()}
    # factor 4: out 64 = 4·16, in 48 = 4·12; W2 (16, 12) of rank 2
    tuned["lin.weight"] += block_kron(torch.randn(4, 4, generator=g), low_rank(16, 12, 2, g))
    save_state(base, tmp / "base.safetensors"), save_state(tuned, tmp / "tuned.safetensors")
    args = ["extract", str(tmp / "base.safetensors"), str(tmp / "tuned.safetensors"), str(tmp / "k.safetensors")]
    assert main(args + ["--algo", "lokr", "--factor", "4", "--linear-dim", "2"]) == 0
    grouped = _check_recovered(tmp / "k.safetensors", base, tuned, ["lin"])
    params = grouped["lycoris_lin"]
    assert params["lokr_w1"].shape == (4, 4)
    assert params["lokr_w2_a"].shape == (16, 2) and params["lokr_w2_b"].shape == (2, 12)


def _block_rotation(out: int, block: int, generator: torch.Generator) -> torch.Tensor:
    """A proper rotation per block (the exponential of a random skew matrix), block-diagonal (out × out)."""
    blocks = []
    for _ in range(out // block):
        a = 0.3 * torch.randn(block, block, generator=generator)
        blocks.append(torch.linalg.matrix_exp(a - a.t()))
    return torch.block_diag(*blocks)


def test_oft_recovers_block_rotations_and_rescale(planted) -> None:
    base, tmp = planted
    g = torch.Generator().manual_seed(5)
    tuned = {k: v.clone() for k, v in base.items()}
    # LyCORIS' factorization with 8: out 64 → blocks of 8, out 32 → blocks of 4
    tuned["lin.weight"] = _block_rotation(64, 8, g) @ base["lin.weight"]
    rotated = (_block_rotation(32, 4, g) @ base["conv.weight"].reshape(32, -1)).reshape(32, 16, 3, 3)
    tuned["conv.weight"] = (1 + 0.1 * torch.randn(32, 1, 1, 1, generator=g)) * rotated
    save_state(base, tmp / "base.safetensors"), save_state(tuned, tmp / "tuned.safetensors")
    args = ["extract", str(tmp / "base.safetensors"), str(tmp / "tuned.safetensors"), str(tmp / "o.safetensors")]
    assert main(args + ["--algo", "oft"]) == 0
    grouped = _check_recovered(tmp / "o.safetensors", base, tuned, ["lin", "conv"], rtol=1e-4)
    assert grouped["lycoris_lin"]["oft_blocks"].shape == (8, 8, 8)
    assert grouped["lycoris_conv"]["oft_blocks"].shape == (8, 4, 4)
    assert grouped["lycoris_conv"]["rescale"].shape == (32, 1, 1, 1)


def test_rank_selection_modes_follow_the_spectrum(planted) -> None:
    base, tmp = planted
    g = torch.Generator().manual_seed(5)
    sigma = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(64, 6, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(48, 6, generator=g, dtype=torch.float64))[0]
    planted_delta = u @ torch.diag(sigma) @ v.T
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["lin.weight"] = (base["lin.weight"].double() + planted_delta).float()
    save_state(base, tmp / "base.safetensors"), save_state(tuned, tmp / "tuned.safetensors")
    true_delta = tuned["lin.weight"].double() - base["lin.weight"].double()
    s = torch.linalg.svdvals(true_delta)
    cumulative = torch.cumsum(s, 0) / s.sum()
    expected = {
        ("threshold", "0.9"): int((s > 0.9).sum()),  # 4
        ("ratio", "6"): int((s > s[0] / 6).sum()),  # 3
        ("quantile", "0.9"): int(next(i for i, c in enumerate(cumulative) if c >= 0.9)) + 1,  # 3
    }
    assert list(expected.values()) == [4, 3, 3]
    for (mode, param), rank in expected.items():
        path = tmp / f"{mode}.safetensors"
        args = ["extract", str(tmp / "base.safetensors"), str(tmp / "tuned.safetensors"), str(path)]
        assert main(args + ["--mode", mode, "--linear-param", param]) == 0
        params = group_by_module(load_file(path))["lycoris_lin"]
        assert params["lora_down.weight"].shape[0] == rank, mode
        delta, _ = ui_delta(params, base["lin.weight"].double())
        uu, ss, vh = torch.linalg.svd(true_delta)
        best = uu[:, :rank] @ torch.diag(ss[:rank]) @ vh[:rank]  # Eckart–Young optimum
        assert float((delta - best).norm() / best.norm()) < 1e-5, mode


def test_tucker_recovers_a_multilinear_rank_two_conv_delta(planted) -> None:
    base, tmp = planted
    g = torch.Generator().manual_seed(6)
    core = torch.randn(2, 2, 3, 3, generator=g)
    u_out, u_in = torch.randn(32, 2, generator=g), torch.randn(16, 2, generator=g)
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["conv.weight"] += 0.3 * torch.einsum("ijhw,pi,qj->pqhw", core, u_out, u_in)
    save_state(base, tmp / "base.safetensors"), save_state(tuned, tmp / "tuned.safetensors")
    args = ["extract", str(tmp / "base.safetensors"), str(tmp / "tuned.safetensors"), str(tmp / "t.safetensors")]
    assert main(args + ["--tucker", "--conv-dim", "2"]) == 0
    params = _check_recovered(tmp / "t.safetensors", base, tuned, ["conv"])["lycoris_conv"]
    assert params["lora_mid.weight"].shape == (2, 2, 3, 3) and params["lora_down.weight"].shape == (2, 16, 1, 1)


def test_full_mode_is_exact_for_weights_biases_norms_and_embeddings(planted, capsys) -> None:
    base, tmp = planted
    g = torch.Generator().manual_seed(7)
    tuned = {k: v.clone() for k, v in base.items()}
    for key in ("lin.weight", "lin.bias", "norm.weight", "norm.bias", "token_embedding.weight"):
        tuned[key] = tuned[key] + 0.1 * torch.randn(tuned[key].shape, generator=g)
    save_state(base, tmp / "base.safetensors"), save_state(tuned, tmp / "tuned.safetensors")
    args = ["extract", str(tmp / "base.safetensors"), str(tmp / "tuned.safetensors")]
    # without --mode full, norms and embeddings are reported as skipped, the bias change is noted
    assert main(args + [str(tmp / "low.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "norm scale changed: only --mode full extracts it" in out
    assert "embedding changed" in out and "bias changed too" in out
    assert main(args + [str(tmp / "full.safetensors"), "--mode", "full"]) == 0
    grouped = _check_recovered(tmp / "full.safetensors", base, tuned, ["lin", "norm", "token_embedding"], rtol=1e-7)
    _, bias = ui_delta(grouped["lycoris_lin"], base["lin.weight"].double())
    torch.testing.assert_close(bias, (tuned["lin.bias"] - base["lin.bias"]).double())
    _, norm_bias = ui_delta(grouped["lycoris_norm"], base["norm.weight"].double())
    torch.testing.assert_close(norm_bias, (tuned["norm.bias"] - base["norm.bias"]).double())


def test_pipeline_folder_keys_and_reload_into_the_real_unet(tmp_path) -> None:
    base_unet, tuned_unet, text_encoder = tiny_unet(), tiny_unet(), tiny_text_encoder()
    tuned_text_encoder = tiny_text_encoder()
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        attn = tuned_unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
        attn.weight += low_rank(*attn.weight.shape, 2, g, scale=0.2)
        conv = tuned_unet.down_blocks[0].resnets[0].conv1
        conv.weight += low_rank(conv.weight.shape[0], conv.weight[0].numel(), 2, g, 0.2).reshape(conv.weight.shape)
        fc1 = getattr(tuned_text_encoder, "text_model", tuned_text_encoder).encoder.layers[1].mlp.fc1
        fc1.weight += low_rank(*fc1.weight.shape, 2, g, scale=0.2)
    save_pipeline(base_unet, text_encoder, tmp_path / "base")
    save_pipeline(tuned_unet, tuned_text_encoder, tmp_path / "tuned")
    out = tmp_path / "a.safetensors"
    assert main(["extract", str(tmp_path / "base"), str(tmp_path / "tuned"), str(out), "--linear-dim", "2"]) == 0
    keys = {k.partition(".")[0] for k in load_file(out)}
    assert keys == {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_te_text_model_encoder_layers_1_mlp_fc1",  # what UIs read, whatever transformers saved
    }
    unet_only = {k: v for k, v in load_file(out).items() if k.startswith("lora_unet_")}
    save_file(unet_only, str(tmp_path / "unet.safetensors"))
    wrapped = bl.PeftModel.from_pretrained(tiny_unet(), str(tmp_path / "unet.safetensors"))
    sample, t, hidden = torch.randn(1, 4, 8, 8), torch.tensor([3]), torch.randn(1, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            wrapped(sample, t, hidden).sample, tuned_unet(sample, t, hidden).sample, rtol=1e-4, atol=1e-5
        )
    with safe_open(str(out), "pt") as handle:
        settings = json.loads(handle.metadata()["beyondlora_extract"])
    assert settings["algo"] == "locon" and settings["linear_dim"] == 2


def test_sd_single_file_keys_and_subprocess(tmp_path) -> None:
    g = torch.Generator().manual_seed(9)
    base = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": torch.randn(40, 24, 1, 1, generator=g),
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": torch.randn(36, 24, generator=g),
        "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3, generator=g),
    }
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["model.diffusion_model.input_blocks.1.1.proj_in.weight"] += low_rank(40, 24, 2, g).reshape(40, 24, 1, 1)
    tuned["first_stage_model.decoder.conv_in.weight"] += 1.0  # the VAE is not extracted
    save_state(base, tmp_path / "b.safetensors"), save_state(tuned, tmp_path / "t.safetensors")
    paths = [str(tmp_path / name) for name in ("b.safetensors", "t.safetensors", "a.safetensors")]
    result = subprocess.run(
        [sys.executable, "-m", "beyondlora", "extract", *paths, "--linear-dim", "2", "--threads", "1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "extracted 1 layer(s)" in result.stdout
    keys = {k.partition(".")[0] for k in load_file(tmp_path / "a.safetensors")}
    assert keys == {"lora_unet_input_blocks_1_1_proj_in"}


def test_conv1d_conv3d_and_linear_named_like_an_embedder(tmp_path) -> None:
    g = torch.Generator().manual_seed(10)
    base = {
        "c1.weight": torch.randn(16, 8, 3, generator=g),
        "c3.weight": torch.randn(8, 4, 3, 3, 3, generator=g),
        "context_embedder.weight": torch.randn(24, 12, generator=g),  # a Linear, not an embedding table
    }
    tuned = {
        "c1.weight": base["c1.weight"] + low_rank(16, 24, 2, g).reshape(16, 8, 3),
        "c3.weight": base["c3.weight"] + low_rank(8, 108, 2, g).reshape(8, 4, 3, 3, 3),
        "context_embedder.weight": base["context_embedder.weight"] + low_rank(24, 12, 2, g),
    }
    save_state(base, tmp_path / "b.safetensors"), save_state(tuned, tmp_path / "t.safetensors")
    paths = [str(tmp_path / name) for name in ("b.safetensors", "t.safetensors", "a.safetensors")]
    assert main(["extract", *paths, "--linear-dim", "2", "--conv-dim", "2"]) == 0
    grouped = _check_recovered(tmp_path / "a.safetensors", base, tuned, ["c1", "c3", "context_embedder"])
    assert grouped["lycoris_c1"]["lora_down.weight"].shape == (2, 8, 3)
    assert grouped["lycoris_c3"]["lora_up.weight"].shape == (8, 2, 1, 1, 1)
    assert grouped["lycoris_context_embedder"]["lora_down.weight"].shape == (2, 12)


def test_glora_extraction_holds_the_difference_in_b_with_a_zero(planted) -> None:
    """GLoRA from a difference: A = 0 (so ΔW does not depend on W) and B the rank-r SVD, as LoCon's extraction."""
    base, tmp = planted
    g = torch.Generator().manual_seed(8)
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["lin.weight"] += low_rank(64, 48, 3, g)
    core, u_out, u_in = (torch.randn(*shape, generator=g) for shape in ((2, 2, 3, 3), (32, 2), (16, 2)))
    tuned["conv.weight"] += 0.3 * torch.einsum("ijhw,pi,qj->pqhw", core, u_out, u_in)  # rank 2 every way
    save_state(base, tmp / "base.safetensors"), save_state(tuned, tmp / "tuned.safetensors")
    args = ["extract", str(tmp / "base.safetensors"), str(tmp / "tuned.safetensors"), str(tmp / "g.safetensors")]
    assert main(args + ["--algo", "glora", "--linear-dim", "3", "--conv-dim", "2"]) == 0
    grouped = _check_recovered(tmp / "g.safetensors", base, tuned, ["lin", "conv"])
    lin, conv = grouped["lycoris_lin"], grouped["lycoris_conv"]
    assert set(lin) == {"a1.weight", "a2.weight", "b1.weight", "b2.weight", "alpha"}
    assert not lin["a1.weight"].any() and not lin["a2.weight"].any()
    assert lin["b2.weight"].shape == (3, 48) and conv["b2.weight"].shape == (2, 16, 3, 3)
    assert conv["a1.weight"].shape == (16, 2, 1, 1) and float(conv["alpha"]) == 2.0
    assert main(args[:-1] + [str(tmp / "t.safetensors"), "--algo", "glora", "--tucker", "--conv-dim", "2"]) == 0
    conv = _check_recovered(tmp / "t.safetensors", base, tuned, ["lin", "conv"])["lycoris_conv"]
    assert conv["bm.weight"].shape == (2, 2, 3, 3) and conv["b2.weight"].shape == (2, 16, 1, 1)
