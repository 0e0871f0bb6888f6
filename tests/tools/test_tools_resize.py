"""``beyondlora resize``: a delta whose true rank fits is kept exactly; smaller ranks give the Eckart–Young
optimum; dynamic methods pick the ranks their definitions give; other modules are copied unchanged.
ΔW is rebuilt from the files with the independent UI formula (tests/helpers/ui_formula.py)."""

from __future__ import annotations

import json
import re

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import beyondlora as bl
from beyondlora.cli import main
from beyondlora.formats.single_file import group_by_module
from helpers.tool_cases import planted_model
from helpers.ui_formula import ui_delta


def _deltas(path) -> dict[str, torch.Tensor]:
    """ΔW of every module of a file as a (out, in·k) float64 matrix (the UI formula on a zero base; for DoRA
    the low-rank part, without the magnitude)."""
    out = {}
    for key, params in group_by_module(load_file(path)).items():
        params.pop("dora_scale", None)
        shape = {"lycoris_lin": (64, 48), "lycoris_conv": (32, 16, 3, 3), "lycoris_block_proj": (40, 64)}[key]
        out[key] = ui_delta(params, torch.zeros(shape, dtype=torch.float64))[0].reshape(shape[0], -1)
    return out


def _best(delta: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def _lora_file(path, rank: int = 8, true_rank: int | None = None, **config) -> None:
    """A LoRA file (alpha ≠ r) on lin and conv; with ``true_rank``, ΔW has that rank."""
    torch.manual_seed(0)
    defaults = dict(r=rank, alpha=4, target_modules=["lin", "conv"], init_weights=False)
    model = bl.get_peft_model(planted_model(), bl.LoraConfig(**{**defaults, **config}))
    if true_rank is not None:
        with torch.no_grad():
            for name in ("lin", "conv"):
                up = getattr(model.base_model, name).adapters["default"].lora_up
                up.copy_(torch.randn(up.shape[0], true_rank) @ torch.randn(true_rank, rank))
    model.save_pretrained(str(path))


def test_rank_that_fits_keeps_the_delta_and_smaller_ranks_are_optimal(tmp_path, capsys) -> None:
    source = tmp_path / "lora.safetensors"
    _lora_file(source, rank=8, true_rank=3)
    before = _deltas(source)
    assert main(["resize", str(source), str(tmp_path / "r3.safetensors"), "--rank", "3"]) == 0
    assert "rank    8 → 3" in capsys.readouterr().out
    after = _deltas(tmp_path / "r3.safetensors")
    grouped = group_by_module(load_file(tmp_path / "r3.safetensors"))
    for key in before:
        assert grouped[key]["lora_down.weight"].shape[0] == 3
        assert float((after[key] - before[key]).norm() / before[key].norm()) < 1e-5, key
    assert main(["resize", str(source), str(tmp_path / "r2.safetensors"), "--rank", "2"]) == 0
    out = capsys.readouterr().out
    after = _deltas(tmp_path / "r2.safetensors")
    for key in before:
        best = _best(before[key], 2)
        assert float((after[key] - best).norm() / best.norm()) < 1e-5, key
        s = torch.linalg.svdvals(before[key])
        expected_error = float(s[2:].square().sum().sqrt() / s.square().sum().sqrt())
        assert re.search(rf"{key} +rank +8 → 2 +relative error {expected_error:.2e}", out), (key, out)


def test_dynamic_methods_pick_the_ranks_their_definitions_give(tmp_path) -> None:
    torch.manual_seed(1)
    sigma = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    model = bl.get_peft_model(planted_model(), bl.LoraConfig(r=6, alpha=6, target_modules=["lin"], init_weights=False))
    adapter = model.base_model.lin.adapters["default"]
    with torch.no_grad():
        adapter.lora_up.copy_(torch.linalg.qr(torch.randn(64, 6))[0] * sigma)
        adapter.lora_down.copy_(torch.linalg.qr(torch.randn(48, 6))[0].T)
    source = tmp_path / "spectrum.safetensors"
    model.save_pretrained(str(source))
    s = torch.linalg.svdvals(_deltas(source)["lycoris_lin"])
    fro = torch.sqrt(torch.cumsum(s**2, 0) / (s**2).sum())
    cumulative = torch.cumsum(s, 0) / s.sum()
    cases = {
        ("sv_ratio", "5", None): int((s > s[0] / 5).sum()),  # σ > 1.6: 3
        ("sv_fro", "0.995", None): next(i for i, v in enumerate(fro) if v >= 0.995) + 1,  # 4
        ("sv_cumulative", "0.8", None): next(i for i, v in enumerate(cumulative) if v >= 0.8) + 1,  # 3
        ("sv_ratio", "100", "2"): 2,  # --rank caps a dynamic rank
    }
    assert list(cases.values()) == [3, 4, 3, 2]
    for (method, param, cap), rank in cases.items():
        out = tmp_path / f"{method}-{param}.safetensors"
        args = ["resize", str(source), str(out), "--dynamic-method", method, "--dynamic-param", param]
        assert main(args + (["--rank", cap] if cap else [])) == 0
        params = group_by_module(load_file(out))["lycoris_lin"]
        assert params["lora_down.weight"].shape[0] == rank, (method, param)
        with safe_open(str(out), "pt") as handle:
            assert json.loads(handle.metadata()["beyondlora_resize"])["method"] == method


def test_dylora_tucker_and_dora_sources_and_untouched_other_modules(tmp_path) -> None:
    torch.manual_seed(2)
    dylora = bl.get_peft_model(
        planted_model(), bl.DyLoraConfig(r=8, alpha=8, block_size=4, target_modules=["lin"], init_weights=False)
    )
    dylora.save_pretrained(str(tmp_path / "dylora.safetensors"))
    tucker = tmp_path / "tucker.safetensors"
    _lora_file(tucker, rank=4, target_modules=["conv"], use_effective_conv2d=True)
    dora = tmp_path / "dora.safetensors"
    _lora_file(dora, rank=6, target_modules=["block.proj"], use_dora=True)
    lokr = bl.get_peft_model(planted_model(), bl.LoKrConfig(r=2, alpha=3, target_modules=["lin"], init_weights=False))
    lokr.save_pretrained(str(tmp_path / "lokr.safetensors"))
    # one file with LoRA (Tucker) on conv, DoRA on block.proj and LoKr on lin
    mixed = {**load_file(tucker), **load_file(dora), **load_file(tmp_path / "lokr.safetensors")}
    save_file(mixed, str(tmp_path / "mixed.safetensors"))
    for source, rank in ((tmp_path / "dylora.safetensors", 4), (tmp_path / "mixed.safetensors", 3)):
        out = tmp_path / f"small-{source.name}"
        assert main(["resize", str(source), str(out), "--rank", str(rank)]) == 0
        before, after, written = _deltas(source), _deltas(out), load_file(out)
        for key, delta in before.items():
            if source.name == "mixed.safetensors" and key == "lycoris_lin":  # LoKr: copied unchanged
                for name, tensor in group_by_module(load_file(source))[key].items():
                    assert torch.equal(written[f"{key}.{name}"], tensor)
                continue
            best = _best(delta, rank)
            assert written[f"{key}.lora_down.weight"].shape[0] == rank
            assert float((after[key] - best).norm() / best.norm()) < 1e-5, (source.name, key)
    written = load_file(tmp_path / "small-mixed.safetensors")
    assert "lycoris_conv.lora_mid.weight" not in written  # a Tucker module becomes a plain LoCon
    assert written["lycoris_conv.lora_down.weight"].shape == (3, 16, 3, 3)
    assert torch.equal(written["lycoris_block_proj.dora_scale"], load_file(dora)["lycoris_block_proj.dora_scale"])


def test_glora_modules_are_copied_unchanged_and_a_glora_file_is_refused(tmp_path) -> None:
    torch.manual_seed(3)
    glora = tmp_path / "glora.safetensors"
    config = bl.GLoRAConfig(r=4, target_modules=["conv"], init_weights=False)
    bl.get_peft_model(planted_model(), config).save_pretrained(str(glora))
    lora = tmp_path / "lora.safetensors"
    _lora_file(lora, rank=6, target_modules=["lin"])
    save_file({**load_file(glora), **load_file(lora)}, str(tmp_path / "mixed.safetensors"))
    out = tmp_path / "small.safetensors"
    assert main(["resize", str(tmp_path / "mixed.safetensors"), str(out), "--rank", "2"]) == 0
    written = load_file(out)
    assert written["lycoris_lin.lora_down.weight"].shape[0] == 2
    for name, tensor in load_file(glora).items():  # ΔW depends on W: nothing to re-factorize as a LoRA
        assert torch.equal(written[name], tensor), name
    assert main(["resize", str(glora), str(tmp_path / "none.safetensors"), "--rank", "2"]) != 0
    assert not (tmp_path / "none.safetensors").exists()
