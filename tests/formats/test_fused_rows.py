"""A fused layer's single-file module ⇄ the layers it stacks (Flux's qkv and linear1): each split part, and
each joined module, applies exactly the rows of ΔW an independent computation gives; the cases no module
of the algorithm can hold are refused, naming the key and the reason."""

from __future__ import annotations

import pytest
import torch

from beyondlora.errors import FormatError
from beyondlora.formats.fused import join_rows, split_rows
from helpers.ui_formula import ui_delta

IN = 12
#: Flux's linear1 at a tiny width: q, k, v of 16 rows, the MLP's input of 64
SIZES = [16, 16, 16, 64]
WHERE = "x.safetensors: lora_unet_single_blocks_0_linear1"


def _rand(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.5


def fused_file(algo: str, out: int, seed: int = 0, **form) -> dict[str, torch.Tensor]:
    """Random single-file tensors of one fused linear (out, IN), by the format's shapes."""
    g = torch.Generator().manual_seed(seed)
    r = form.get("r", 3)
    alpha = torch.tensor(form.get("alpha", 1.5), dtype=torch.float64)
    if algo == "lora":
        return {
            "lora_down.weight": _rand(r, IN, generator=g),
            "lora_up.weight": _rand(out, r, generator=g),
            "alpha": alpha,
        }
    if algo == "loha":
        params = {f"hada_w{n}_a": _rand(out, r, generator=g) for n in "12"}
        return {**params, **{f"hada_w{n}_b": _rand(r, IN, generator=g) for n in "12"}, "alpha": alpha}
    if algo == "lokr":  # W1 (a, c) ⊗ W2 (b, d): out = a·b, IN = c·d
        b = form["b"]
        params = {"lokr_w1": _rand(out // b, 3, generator=g)}
        if form.get("w2_full"):
            params["lokr_w2"] = _rand(b, IN // 3, generator=g)
        else:
            params["lokr_w2_a"], params["lokr_w2_b"] = _rand(b, r, generator=g), _rand(r, IN // 3, generator=g)
        return {**params, "alpha": alpha}
    if algo == "full":
        return {"diff": _rand(out, IN, generator=g), "diff_b": _rand(out, generator=g)}
    raise AssertionError(algo)


def delta(params: dict[str, torch.Tensor], out: int) -> torch.Tensor:
    """What a UI adds for these tensors (independent of the library), with the bias delta as a last column."""
    weight, bias = ui_delta(params, torch.zeros(out, IN, dtype=torch.float64))
    return weight if bias is None else torch.cat([weight, bias[:, None]], dim=1)


CASES = [
    ("lora", {}),
    ("loha", {}),
    ("lokr", {"b": 8}),  # every size a multiple of W2's 8 rows
    ("lokr", {"b": 16, "w2_full": True}),
    ("full", {}),
]


@pytest.mark.parametrize(("algo", "form"), CASES, ids=[f"{a}-{i}" for i, (a, _) in enumerate(CASES)])
def test_a_fused_module_splits_into_exactly_its_rows_and_joins_back(algo: str, form: dict) -> None:
    fused = fused_file(algo, sum(SIZES), **form)
    expected = delta(fused, sum(SIZES))
    parts = split_rows(fused, SIZES, WHERE)
    start = 0
    for part, size in zip(parts, SIZES, strict=True):
        torch.testing.assert_close(delta(part, size), expected[start : start + size], rtol=1e-12, atol=1e-12)
        start += size
    joined = join_rows(parts, SIZES, WHERE)
    torch.testing.assert_close(delta(joined, sum(SIZES)), expected, rtol=1e-12, atol=1e-12)
    if algo in ("lora", "loha", "lokr"):  # parts that came from one module join back at its rank
        assert joined.keys() == fused.keys()
        assert all(joined[k].shape == fused[k].shape for k in fused)


@pytest.mark.parametrize("algo", ["lora", "loha", "full"])
def test_separately_trained_layers_join_exactly_missing_ones_adding_nothing(algo: str) -> None:
    sizes = [16, 16, 16]
    parts = [fused_file(algo, 16, seed=i, r=2 + i, alpha=0.5 + i) for i in range(3)]
    parts[1] = None  # k has no adapter: its rows of ΔW are zero
    joined = join_rows(parts, sizes, WHERE)
    expected = torch.cat([torch.zeros(16, IN + (algo == "full")) if p is None else delta(p, 16) for p in parts])
    torch.testing.assert_close(delta(joined, 48), expected, rtol=1e-12, atol=1e-12)
    if algo == "lora":  # a rank-(2 + 4) LoRA with a block-diagonal up, scale 1
        assert joined["lora_down.weight"].shape == (6, IN) and joined["alpha"].item() == 6
        assert torch.count_nonzero(joined["lora_up.weight"][16:32]) == 0


def test_a_block_diagonal_lora_splits_into_parts_of_their_own_rank() -> None:
    """kohya's split-qkv files (and ours, joined from separate LoRAs): rank Σr_i with a block-diagonal up."""
    sizes = [16, 16, 16]
    parts = [fused_file("lora", 16, seed=i, r=2 + i, alpha=0.5 + i) for i in range(3)]
    joined = join_rows(parts, sizes, WHERE)
    split = split_rows(joined, sizes, WHERE)
    assert [p["lora_down.weight"].shape[0] for p in split] == [2, 3, 4]
    for part, back in zip(parts, split, strict=True):
        torch.testing.assert_close(delta(back, 16), delta(part, 16), rtol=1e-12, atol=1e-12)


def test_lokr_splits_only_on_w2_row_blocks() -> None:
    fused = fused_file("lokr", sum(SIZES), b=7)  # W2 of 7 rows, W1 of 16: 112 = 16 · 7
    with pytest.raises(FormatError, match=r"lora_unet_single_blocks_0_linear1.*W2's 7 rows.*row 16"):
        split_rows(fused, SIZES, WHERE)


def test_lokr_joins_only_layers_sharing_w2() -> None:
    own = [fused_file("lokr", 16, seed=i, b=8) for i in range(3)]
    with pytest.raises(FormatError, match=r"lora_unet_single_blocks_0_linear1.*share W2.*differ"):
        join_rows(own, [16] * 3, WHERE)
    shared = split_rows(fused_file("lokr", 48, b=8), [16] * 3, WHERE)
    with pytest.raises(FormatError, match=r"1 of the 3 layers have no LoKr"):
        join_rows([shared[0], None, shared[2]], [16] * 3, WHERE)


def test_what_cannot_be_split_or_joined_is_refused_with_the_reason() -> None:
    ia3 = {"weight": torch.ones(48), "on_input": torch.tensor(0)}
    with pytest.raises(FormatError, match=r"linear1: a ia3 module cannot be split"):
        split_rows(ia3, [16] * 3, WHERE)
    dora = {**fused_file("lora", 48), "dora_scale": torch.ones(48, 1)}
    with pytest.raises(FormatError, match=r"linear1: DoRA"):
        split_rows(dora, [16] * 3, WHERE)
    mixed = [fused_file("lora", 16), fused_file("loha", 16), None]
    with pytest.raises(FormatError, match=r"linear1: the layers it fuses hold different algorithms \['loha', 'lora'\]"):
        join_rows(mixed, [16] * 3, WHERE)
    with pytest.raises(FormatError, match=r"linear1: lora_up.weight has 48 output rows, the fused layer 112"):
        split_rows(fused_file("lora", 48), SIZES, WHERE)
