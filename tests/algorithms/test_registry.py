"""An algorithm is one room: a new algorithm defined in one place (here, a rank-one ``u vᵀ`` adapter written
in this test) trains, saves, reloads, converts and is inspected through the registry alone, with every
result checked against ``W + u vᵀ`` computed here."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

import beyondlora as bl
from beyondlora.algorithms import ALGORITHMS, Adapter
from beyondlora.algorithms.base import REGISTRY
from beyondlora.algorithms.codec import reshaped
from beyondlora.algorithms.config_base import AdapterConfig, algo_names, build_config
from beyondlora.ops.geometry import LayerGeometry
from beyondlora.tools.extract import extract_names
from beyondlora.tools.inspect import inspect


@dataclass(kw_only=True)
class OuterConfig(AdapterConfig):
    peft_type: ClassVar[str] = "OUTER"
    algorithm: ClassVar[str] = "outer"


@pytest.fixture
def outer() -> Iterator[type[Adapter]]:
    """Define the algorithm (registering it, as a file in algorithms/ would), and take it out again."""

    class Outer(Adapter):
        """ΔW = t · u vᵀ on linear layers; its tensors are ``outer_u`` (out,) and ``outer_v`` (in,)."""

        algorithm = "outer"
        config_class = OuterConfig
        supported_kinds = frozenset({"linear"})
        has_rank = False
        file_keys = frozenset({"outer_u", "outer_v"})
        folder_type = "OUTER"
        folder_keys = file_keys
        algo_names = ("outer",)

        def __init__(self, geometry: LayerGeometry, options: Any, base_weight: Tensor) -> None:
            super().__init__(geometry, options, base_weight)
            self.outer_u = nn.Parameter(torch.zeros(geometry.out_dim))
            self.outer_v = nn.Parameter(torch.randn(geometry.in_dim))

        def delta_weight(self, base_weight: Tensor, draw: Any = None, factor: float = 1.0) -> Tensor:
            return torch.outer(self.outer_u * factor, self.outer_v)

        def file_tensors(self) -> dict[str, Tensor]:
            return {"outer_u": self.outer_u * self.multiplier, "outer_v": self.outer_v}

        @classmethod
        def read_file(cls, params, geometry, where, rank_hint):
            u = reshaped(params, "outer_u", (geometry.out_dim,), where)
            return {"outer_u": u, "outer_v": reshaped(params, "outer_v", (geometry.in_dim,), where)}, {}

        @classmethod
        def file_weight_shape(cls, params, where):
            return (params["outer_u"].numel(), params["outer_v"].numel()), False

        def folder_tensors(self) -> dict[str, Tensor]:
            return self.file_tensors()

        def summary_notes(self) -> list[str]:
            return ["rank one"]

    yield Outer
    del REGISTRY["outer"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


def _expected(base: nn.Module, u: Tensor, v: Tensor, x: Tensor, t: float = 1.0) -> Tensor:
    """The base model with ``W0 + t · u vᵀ`` in its first layer, written out here."""
    w = base[0].weight + t * torch.outer(u, v)
    return base[2](torch.relu(x @ w.T + base[0].bias))


def test_extract_offers_the_factorized_algorithms() -> None:
    assert extract_names() == ["glora", "locon", "lokr", "oft"]  # Full and Norm store exact differences (--mode full)


def test_a_new_algorithm_works_everywhere_through_the_registry(outer, tmp_path: Path) -> None:
    assert ALGORITHMS["outer"] is outer and algo_names()["outer"] == "outer"
    assert isinstance(build_config("outer", target_modules=["0"], r=4, decompose_factor=2), OuterConfig)
    model = bl.get_peft_model(_model(), OuterConfig(target_modules=["0"]))
    adapter = model.base_model[0].adapters["default"]
    with torch.no_grad():
        adapter.outer_u.normal_()
    u, v = adapter.outer_u.detach().clone(), adapter.outer_v.detach().clone()
    x = torch.randn(4, 6)
    expected = _expected(_model(), u, v, x)
    torch.testing.assert_close(model(x), expected)

    model.set_multiplier(0.5)
    torch.testing.assert_close(model(x), _expected(_model(), u, v, x, 0.5))
    model.save_pretrained(tmp_path / "outer.safetensors")
    model.save_pretrained(tmp_path / "folder")
    for path in (tmp_path / "outer.safetensors", tmp_path / "folder"):
        reloaded = bl.PeftModel.from_pretrained(_model(), path)
        torch.testing.assert_close(reloaded(x), _expected(_model(), u, v, x, 0.5))

    info = inspect(tmp_path / "outer.safetensors")
    (module,) = info["modules"]
    assert (module["algorithm"], module["notes"], module["rank"]) == ("outer", ["rank one"], None)
    assert module["delta_norm"] == pytest.approx(float(torch.outer(0.5 * u, v).double().norm()), rel=1e-6)

    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), _expected(_model(), u, v, x, 0.5))


def test_lokr_names_a_rank_that_has_no_effect() -> None:
    model = bl.get_peft_model(nn.Sequential(nn.Linear(64, 64)), bl.LoKrConfig(r=8, target_modules=["0"]))
    full = model.base_model[0].adapters["default"]  # 64 = 8 × 8: W2 8×8, rank 8 ≥ 8/2 keeps it full
    assert full.w2_is_full and "rank 8 has no effect" in full.unused_options()["r"]
    model = bl.get_peft_model(nn.Sequential(nn.Linear(64, 64)), bl.LoKrConfig(r=2, target_modules=["0"]))
    assert model.base_model[0].adapters["default"].unused_options() == {}
