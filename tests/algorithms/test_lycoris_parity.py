"""Parity of beyondlora's adapters with the installed LyCORIS (``lycoris-lora``).

For LoRA/LoCon, LoHa, LoKr, (IA)³ and Full on four layers (Linear 64→128, Conv2d 32→64 3×3, Conv1d
16→24 k=3, Linear 127→320) and a spread of options, this checks that

1. the tensors we write to a single file (``export_tensors``) have exactly the names and shapes of
   LyCORIS's saved tensors (``state_dict()``), ``alpha`` and ``on_input`` included;
2. after copying our randomized parameters into the LyCORIS module, LyCORIS's ΔW equals our
   ``delta_weight`` in float64:

   - against ``get_diff_weight(multiplier=1)``; for LoHa/LoKr only with alpha == r, because LyCORIS
     multiplies by its scale twice there (once inside ``get_weight`` and again in ``get_diff_weight``);
   - for every alpha, against LyCORIS's unscaled rebuild (LoCon ``make_weight()``, LoHa/LoKr functional
     rebuild with gamma = 1) times LyCORIS's own ``self.scale``, and against ``get_weight(shape)`` — the
     ΔW LyCORIS's forward actually adds for LoHa/LoKr;

3. ``beyondlora.ops.factorization.factorization`` equals ``lycoris.functional.general.factorization``.

LyCORIS LoKr forces scale 1 when both W1 and W2 are full matrices; beyondlora always uses alpha / r, so
those cases run with alpha == r (the divergence itself is pinned in its own test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from lycoris.functional import general as lycoris_functional
from lycoris.functional.loha import diff_weight as lycoris_loha_rebuild
from lycoris.functional.lokr import kron_weight as lycoris_kron_weight
from lycoris.modules.full import FullModule
from lycoris.modules.ia3 import IA3Module
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule
from torch import Tensor, nn

from beyondlora.algorithms import IA3, Full, LoHa, LoKr, LoRA
from beyondlora.algorithms.base import AdapterOptions
from beyondlora.formats.lycoris_codecs import export_tensors
from beyondlora.ops.factorization import factorization
from beyondlora.ops.geometry import LayerGeometry

DTYPE = torch.float64
RTOL = 1e-10
ATOL = 1e-12

LAYERS = {
    "linear": lambda: nn.Linear(64, 128, dtype=DTYPE),
    "conv2d": lambda: nn.Conv2d(32, 64, 3, padding=1, dtype=DTYPE),
    "conv1d": lambda: nn.Conv1d(16, 24, 3, dtype=DTYPE),
    "linear_odd": lambda: nn.Linear(127, 320, dtype=DTYPE),
}
CONVS = ("conv2d", "conv1d")

OURS = {"lora": LoRA, "loha": LoHa, "lokr": LoKr, "ia3": IA3, "full": Full}
THEIRS = {"lora": LoConModule, "loha": LohaModule, "lokr": LokrModule, "ia3": IA3Module, "full": FullModule}
#: LyCORIS state-dict entries that are metadata, not trainable tensors of the adapter


@dataclass(frozen=True)
class Case:
    algorithm: str
    layer: str
    r: int = 4
    alpha: float = 4.0
    tucker: bool = False
    decompose_both: bool = False
    factor: int = -1
    unbalanced: bool = False
    on_input: bool = False

    @property
    def id(self) -> str:
        parts = [self.algorithm, self.layer]
        if self.algorithm in ("lora", "loha", "lokr"):
            parts.append(f"r{self.r}a{self.alpha:g}")
        if self.tucker:
            parts.append("tucker")
        if self.decompose_both:
            parts.append("both")
        if self.factor != -1:
            parts.append(f"f{self.factor}")
        if self.unbalanced:
            parts.append("unbalanced")
        if self.on_input:
            parts.append("on_input")
        return "-".join(parts)

    def options(self) -> AdapterOptions:
        return AdapterOptions(
            r=self.r,
            alpha=self.alpha,
            use_effective_conv2d=self.tucker,
            decompose_both=self.decompose_both,
            decompose_factor=self.factor,
            unbalanced_factorization=self.unbalanced,
            on_input=self.on_input,
        )

    def lycoris_kwargs(self) -> dict:
        kwargs = {"lora_dim": self.r, "alpha": self.alpha, "use_tucker": self.tucker}
        if self.algorithm == "lokr":
            kwargs.update(
                decompose_both=self.decompose_both, factor=self.factor, unbalanced_factorization=self.unbalanced
            )
        if self.algorithm == "ia3":
            kwargs["train_on_input"] = self.on_input
        return kwargs


def _cases() -> list[Case]:
    cases: list[Case] = []
    for layer in LAYERS:
        cases += [Case("lora", layer, 4, 4.0), Case("lora", layer, 4, 2.0)]
        cases += [Case("loha", layer, 4, 4.0), Case("loha", layer, 4, 1.0)]
        # LoKr: W2 decomposed (r small) or full (r large), every factor
        cases += [Case("lokr", layer, 4, 4.0, factor=f) for f in (-1, 2, 4, 8)]
        cases += [Case("lokr", layer, 2, 2.0, factor=f) for f in (-1, 8)]
        cases += [Case("lokr", layer, 64, 64.0), Case("lokr", layer, 64, 64.0, factor=4)]
        cases += [Case("lokr", layer, 2, 2.0, decompose_both=True), Case("lokr", layer, 2, 3.0, decompose_both=True)]
        cases += [Case("lokr", layer, 4, 4.0, unbalanced=True), Case("lokr", layer, 2, 2.0, factor=4, unbalanced=True)]
        cases += [Case("lokr", layer, 1, 0.5, unbalanced=True)]
        cases += [Case("lokr", layer, 2, 1.0)]
        cases += [Case("ia3", layer), Case("ia3", layer, on_input=True), Case("full", layer)]
    # W1 decomposed while W2 is full (128 → (16, 8) unbalanced: W1 (16, 8), W2 (8, 8))
    cases += [Case("lokr", "linear", 4, 4.0, decompose_both=True, unbalanced=True)]
    cases += [Case("lokr", "linear", 5, 2.0, decompose_both=True, unbalanced=True)]
    cases += [Case("lokr", "linear_odd", 64, 64.0, decompose_both=True)]
    for layer in CONVS:
        cases += [Case("lora", layer, 4, 4.0, tucker=True), Case("lora", layer, 3, 6.0, tucker=True)]
        cases += [Case("loha", layer, 4, 4.0, tucker=True), Case("loha", layer, 3, 1.5, tucker=True)]
        cases += [Case("lokr", layer, 2, 2.0, tucker=True), Case("lokr", layer, 2, 5.0, tucker=True)]
        cases += [Case("lokr", layer, 2, 2.0, tucker=True, factor=4, decompose_both=True)]
        cases += [Case("lokr", layer, 64, 64.0, tucker=True)]  # Tucker asked for, but W2 is full
    # W1 decomposed and W2 in Tucker form: conv2d W1 (8, 4), W2 (8, 8); conv1d W1 (6, 4), W2 (4, 4)
    cases += [Case("lokr", "conv2d", 2, 2.0, tucker=True, decompose_both=True, unbalanced=True)]
    cases += [Case("lokr", "conv2d", 2, 0.5, tucker=True, decompose_both=True, unbalanced=True)]
    cases += [Case("lokr", "conv1d", 1, 1.0, tucker=True, decompose_both=True, unbalanced=True)]
    cases += [Case("lokr", "conv1d", 1, 3.0, tucker=True, decompose_both=True, unbalanced=True)]
    return cases


CASES = _cases()
RANKED = [c for c in CASES if c.algorithm in ("lora", "loha", "lokr")]
#: cases where LyCORIS's get_diff_weight applies the scale once (LoHa/LoKr square it unless alpha == r)
SINGLE_SCALE = [c for c in CASES if c.algorithm not in ("loha", "lokr") or c.alpha == c.r]


def _params(cases: list[Case]) -> list:
    return [pytest.param(c, id=c.id) for c in cases]


def _seed(case: Case) -> int:
    return sum(ord(ch) * (i + 1) for i, ch in enumerate(case.id)) % (2**31)


def _build(case: Case) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(base layer, our randomized adapter, LyCORIS module holding the same tensors), all float64."""
    torch.manual_seed(_seed(case))
    base = LAYERS[case.layer]()
    with torch.no_grad():
        for p in base.parameters():
            p.normal_()
    geometry = LayerGeometry.of(base)
    ours = OURS[case.algorithm](geometry, case.options(), geometry.canonical_weight(base)).to(DTYPE)
    generator = torch.Generator().manual_seed(_seed(case) + 1)
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=DTYPE) * 0.5)
    theirs = THEIRS[case.algorithm](f"lycoris_{case.layer}", base, 1.0, **case.lycoris_kwargs()).to(DTYPE).eval()
    with torch.no_grad():
        for name, tensor in ours.named_parameters():
            target = _lycoris_tensor(theirs, name)
            target.copy_(tensor.reshape(target.shape))
    return base, ours, theirs


def _lycoris_tensor(theirs: nn.Module, name: str) -> Tensor:
    """The LyCORIS parameter that holds our parameter ``name``."""
    if isinstance(theirs, FullModule):
        return {"diff": theirs.weight, "diff_b": theirs.bias}[name]
    if isinstance(theirs, LoConModule):
        return getattr(theirs, name).weight
    return getattr(theirs, name)


def _ours_delta(base: nn.Module, ours: nn.Module) -> Tensor:
    with torch.no_grad():
        return ours.delta_weight(ours.geometry.canonical_weight(base).detach())


def _assert_close(actual: Tensor, expected: Tensor) -> None:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.to(DTYPE), expected.to(DTYPE), rtol=RTOL, atol=ATOL)


# --- 1. names and shapes --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", _params(CASES))
def test_file_tensor_names_and_shapes(case: Case) -> None:
    """What we write to a single file has exactly LyCORIS's names and shapes (alpha, on_input included); a
    Tucker LoKr's W2 as the full ``lokr_w2`` (b, d, *k) its Tucker factors rebuild, which every consumer applies."""
    _, ours, theirs = _build(case)
    our_shapes = {name: tuple(t.shape) for name, t in export_tensors(ours).items()}
    their_shapes = {name: tuple(t.shape) for name, t in theirs.state_dict().items()}
    if case.algorithm == "lokr" and "lokr_t2" in their_shapes:
        core, out_side, in_side = (their_shapes.pop(k) for k in ("lokr_t2", "lokr_w2_a", "lokr_w2_b"))
        their_shapes["lokr_w2"] = (out_side[1], in_side[1], *core[2:])
    assert our_shapes == their_shapes


# --- 2. ΔW ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", _params(SINGLE_SCALE))
def test_delta_weight_equals_get_diff_weight(case: Case) -> None:
    base, ours, theirs = _build(case)
    with torch.no_grad():
        expected, expected_bias = theirs.get_diff_weight(multiplier=1, shape=theirs.shape)
    _assert_close(_ours_delta(base, ours), expected)
    if case.algorithm == "full":
        _assert_close(ours.delta_bias(), expected_bias)
    else:
        assert ours.delta_bias() is None and expected_bias is None


def _lycoris_unscaled(theirs: nn.Module) -> Tensor:
    """LyCORIS's rebuild of ΔW without any scale, in (out, in, *k)."""
    if isinstance(theirs, LoConModule):
        return theirs.make_weight()
    if isinstance(theirs, LohaModule):
        t1, t2 = (theirs.hada_t1, theirs.hada_t2) if theirs.tucker else (None, None)
        weights = (theirs.hada_w1_b, theirs.hada_w1_a, theirs.hada_w2_b, theirs.hada_w2_a, t1, t2)
        return lycoris_loha_rebuild(*weights, gamma=1.0).reshape(theirs.shape)
    w1 = theirs.lokr_w1 if theirs.use_w1 else None
    w1a, w1b = (None, None) if theirs.use_w1 else (theirs.lokr_w1_a, theirs.lokr_w1_b)
    w2 = theirs.lokr_w2 if theirs.use_w2 else None
    w2a, w2b = (None, None) if theirs.use_w2 else (theirs.lokr_w2_a, theirs.lokr_w2_b)
    t2 = theirs.lokr_t2 if theirs.tucker and not theirs.use_w2 else None
    return lycoris_kron_weight(w1, w1a, w1b, w2, w2a, w2b, t2, scale=1.0).reshape(theirs.shape)


@pytest.mark.parametrize("case", _params(RANKED))
def test_delta_weight_equals_rebuild_times_lycoris_scale(case: Case) -> None:
    base, ours, theirs = _build(case)
    assert theirs.scale == pytest.approx(ours.scale, rel=1e-15)
    assert ours.scale == pytest.approx(case.alpha / case.r, rel=1e-15)
    ours_delta = _ours_delta(base, ours)
    with torch.no_grad():
        _assert_close(ours_delta, _lycoris_unscaled(theirs) * theirs.scale)
        if not isinstance(theirs, LoConModule):
            # what LyCORIS's own (non-bypass) forward adds for LoHa/LoKr
            _assert_close(ours_delta, theirs.get_weight(theirs.shape))


def test_lokr_both_full_lycoris_forces_unit_scale() -> None:
    """Pinned known divergence: LyCORIS LoKr ignores alpha when W1 and W2 are both full; we keep alpha / r."""
    case = Case("lokr", "linear", 64, 16.0)
    base, ours, theirs = _build(case)
    assert theirs.use_w1 and theirs.use_w2 and ours.w1_is_full and ours.w2_is_full
    assert theirs.scale == 1.0
    assert ours.scale == pytest.approx(0.25)
    with torch.no_grad():
        _assert_close(_ours_delta(base, ours), _lycoris_unscaled(theirs) * 0.25)


def test_case_table_covers_the_lokr_layouts() -> None:
    """Guard on the table itself: every LoKr layout (W1 full/decomposed × W2 full/decomposed/Tucker) is hit."""
    layouts = set()
    for case in (c for c in CASES if c.algorithm == "lokr"):
        _, ours, _ = _build(case)
        w2 = "full" if ours.w2_is_full else ("tucker" if ours.lokr_t2 is not None else "lora")
        layouts.add(("full" if ours.w1_is_full else "lora", w2))
    assert layouts == {(w1, w2) for w1 in ("full", "lora") for w2 in ("full", "lora", "tucker")}


# --- 3. factorization ----------------------------------------------------------------------------------
def test_factorization_matches_lycoris() -> None:
    mismatches = []
    for factor in (-1, 1, 2, 3, 4, 8, 16, 32, 64):
        for dimension in range(1, 401):
            ours = tuple(factorization(dimension, factor))
            theirs = tuple(lycoris_functional.factorization(dimension, factor))
            if ours != theirs:
                mismatches.append((dimension, factor, ours, theirs))
            assert math.prod(ours) == dimension
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:10]}"
