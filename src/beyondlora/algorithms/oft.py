"""Diag-OFT (LyCORIS' ``DiagOFTModule``): a block-diagonal rotation of the weight's rows.

With canonical W (out, in, *k) and blocks B (n, b, b), n·b = out: ``Q = B − Bᵀ`` per block, scaled down to
Frobenius norm ``c · out`` over all blocks when above it (``constraint`` c > 0), ``R = (I + Q)(I − Q)⁻¹``, and

    W' = rescale ⊙ (blockdiag(R₁ᵀ, …, Rₙᵀ) W),     ΔW = W' − W

(``rescale`` (out,) only with ``rescaled``).  The block size is ``oft_block_size`` when set, else the smaller
factor of LyCORIS' ``factorization(out, r)``.  The bias is never rotated.

Multiplier t: the layer adds ``t · (W' − W)``, linear in t as for every algorithm (ComfyUI's and
AUTOMATIC1111's strength).  LyCORIS instead blends each rotation, ``t·R + (1 − t)·I``: the same for OFT
without ``rescale``, not with it.  Files therefore hold strength 1 only.

The bypass rotates the base layer's own output ``W x`` block by block (exact when no block mixes the
groups of a grouped convolution); the rebuild rotates W's rows the same way.  Files: ``oft_blocks``,
``rescale`` (out, 1, …), ``alpha`` = c.  PEFT's OFT rotates the layer's *input*, another function: folders
are refused.  No DoRA, rank dropout or input dropout (LyCORIS has none for rotations; each is refused);
``module_dropout`` skips the whole adapter as for every algorithm.  :class:`RotationAdapter` is shared with
BOFT (:mod:`.boft`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import FormatError
from ..ops.factorization import factorization
from ..ops.geometry import LayerGeometry
from ..ops.rotations import NORM_EPS, cayley, inverse_cayley, nearest_rotation, rotate_blocks, rotate_rows
from .base import Adapter
from .codec import shape_of
from .common import AdapterOptions, Extraction, check_init
from .config_base import AdapterConfig, pattern_value

#: the cost of one pass of blocks over the activations, per value, in full-size multiply-adds (see
#: :meth:`RotationAdapter.stage_passes`)
BLOCK_PASS = 256.0
#: rounds of the alternating rotation / rescale fit in ``extract``
_EXTRACT_ROUNDS = 20
#: why PEFT's OFT/BOFT folders are not ours, and ours cannot be written as theirs
PEFT_ROTATES_INPUT = (
    "PEFT's OFT and BOFT rotate the layer's input (W R x), LyCORIS' and ours rotate its output rows (R W x): "
    "another function; save to a .safetensors file"
)


@dataclass(kw_only=True)
class RotationConfig(AdapterConfig):
    """Fields OFT and BOFT share.

    Attributes:
        r: the largest block size (LyCORIS' ``lora_dim``); it has no scale meaning.
        constraint: c > 0 caps ‖Q‖_F over all blocks at ``c · out`` (LyCORIS' ``constraint``; files' ``alpha``).
        rescaled: a trainable magnitude per output channel multiplying the rotated weight.
        rank_pattern: regex (whole name or dotted suffix) → r for matching modules.
        rank_dropout: not supported (must be 0): a rotation has no rank components to drop.

    The multiplier t adds ``t · (W' − W)`` (linear in t, as ComfyUI / AUTOMATIC1111 apply strength).
    """

    #: rotations train at LoRA's rates: a block's angle moves by about the learning rate per step
    learning_rate: ClassVar[float] = 1e-4

    r: int = 8
    constraint: float = 0.0
    rescaled: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    rank_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if self.constraint < 0:
            raise ValueError(f"constraint must be ≥ 0, got {self.constraint}")
        if self.rank_dropout:
            raise ValueError(f"{self.algorithm} has no rank dropout (a rotation has no rank components)")

    def options_for(self, module_name: str) -> AdapterOptions:
        return dataclasses.replace(
            super().options_for(module_name),
            r=pattern_value(self.rank_pattern, module_name, self.r),
            constraint=float(self.constraint),
            rescaled=self.rescaled,
        )


@dataclass(kw_only=True)
class OFTConfig(RotationConfig):
    """Diag-OFT.  ``oft_block_size``: an exact block size dividing every target's output size (0: from r)."""

    peft_type: ClassVar[str] = "OFT"
    algorithm: ClassVar[str] = "oft"
    oft_block_size: int = 0

    def options_for(self, module_name: str) -> AdapterOptions:
        return dataclasses.replace(super().options_for(module_name), oft_block_size=self.oft_block_size)


class RotationAdapter(Adapter):
    """What OFT and BOFT share: parameters ``oft_blocks`` and ``rescale``, ΔW = rescale ⊙ rotate(W) − W,
    the bypass on the base output, and the single-file codec.  Subclasses give the block shape
    (:meth:`block_shape`), the rotation of a last axis (:meth:`rotate`) and the group span (:meth:`span`)."""

    file_keys = frozenset({"oft_blocks", "rescale"})
    has_rank = False
    foreign_folder = PEFT_ROTATES_INPUT
    scales_base = True
    bypass_uses_base = True
    #: the number of dimensions ``oft_blocks`` has in this algorithm's files
    blocks_ndim: ClassVar[int]

    def __init__(self, geometry: LayerGeometry, options: AdapterOptions, base_weight: Tensor) -> None:
        if options.use_dora:
            raise ValueError(
                f"{self.algorithm} has no DoRA (use_dora): LyCORIS defines none for rotations; rescaled=True gives "
                "them a magnitude per output channel"
            )
        if options.rank_dropout or options.dropout:
            raise ValueError(f"{self.algorithm} has no rank dropout or input dropout; set them to 0")
        if options.r <= 0:
            raise ValueError(f"r must be positive, got {options.r}")
        if options.constraint < 0:
            raise ValueError(f"constraint must be ≥ 0, got {options.constraint}")
        super().__init__(geometry, options, base_weight)
        check_init(options, self.algorithm)
        self.constraint = options.constraint
        self.oft_blocks = nn.Parameter(torch.zeros(self.block_shape()))
        self.rescale = nn.Parameter(torch.ones(geometry.out_dim)) if options.rescaled else None
        if options.init_weights is False:
            with torch.no_grad():
                nn.init.normal_(self.oft_blocks, std=0.1)

    # --- what a subclass defines -------------------------------------------------------------------
    def block_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def rotate(self, y: Tensor, rotations: Tensor) -> Tensor:
        """The rotation of y's last axis (…, out) by :meth:`rotations`."""
        raise NotImplementedError

    def span(self) -> int:
        """How many consecutive output channels the rotation mixes at most (aligned runs)."""
        raise NotImplementedError

    # --- the math ------------------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.oft_blocks.shape[-1]

    def rotations(self) -> Tensor:
        """Every block's rotation R, shaped as ``oft_blocks``, with the constraint ``c · out`` over all."""
        return cayley(self.oft_blocks, self.constraint * self.geometry.out_dim)

    def _rotated(self, y: Tensor, rotations: Tensor | None = None) -> Tensor:
        """``rescale ⊙ M y`` along y's last axis (``rotations``: :meth:`rotations`, when already at hand)."""
        rotated = self.rotate(y, (self.rotations() if rotations is None else rotations).to(y.dtype))
        return rotated if self.rescale is None else rotated * self.rescale.to(y.dtype)

    def delta_weight(self, base_weight: Tensor, draw: Any = None, factor: float = 1.0) -> Tensor:
        """``factor · (rescale ⊙ (M W) − W)`` in canonical shape, W's rows rotated blockwise (no out × out M)."""
        delta = rotate_rows(base_weight, self._rotated) - base_weight
        return delta if factor == 1.0 else delta * factor

    def base_bypass(self, x: Tensor, apply_base: Callable[[Tensor], Tensor], draw: Any = None) -> Tensor | None:
        """``rescale ⊙ M (W x) − W x``: the base output rotated along its channel axis."""
        if not self._exact_bypass():
            return None
        y = apply_base(x).to(self.param_dtype)  # an embedding's output comes in the base weight's dtype
        moved = y.movedim(1, -1) if self.geometry.channel_axis == 1 else y
        delta = self._rotated(moved) - moved
        return delta.movedim(-1, 1) if self.geometry.channel_axis == 1 else delta

    def transform_output(self, out: Tensor, bias: Tensor | None, draw: Any = None) -> Tensor | None:
        """``rescale ⊙ M (y − b) + b = rescale ⊙ M y + (b − rescale ⊙ M b)`` for the base output y: the bias
        is never rotated, and its correction is one vector."""
        if not self._exact_bypass():
            return None
        y = out.to(self.param_dtype)
        moved = y.movedim(1, -1) if self.geometry.channel_axis == 1 else y
        rotations = self.rotations()  # the Cayley solves once, for the output and the bias
        rotated = self._rotated(moved, rotations)
        if bias is not None:
            b = bias.to(rotated.dtype)
            rotated = rotated + (b - self._rotated(b, rotations))
        return rotated.movedim(-1, 1) if self.geometry.channel_axis == 1 else rotated

    def _exact_bypass(self) -> bool:
        """Rotating outputs equals rotating W's rows unless a block mixes two groups of a grouped conv."""
        g = self.geometry
        return g.groups == 1 or (g.out_dim // g.groups) % self.span() == 0

    def bypass_flops(self, tokens: int) -> float:
        """The rotation of the base output ``W x`` at ``tokens`` positions (:meth:`rotation_work`); ``W x`` itself
        is the base layer's own output."""
        return self.rotation_work(tokens) if self._exact_bypass() else math.inf

    def rotation_work(self, positions: int) -> float:
        """Multiply-add equivalents of rotating ``positions`` vectors of the output size: each stage's b
        multiply-adds per value plus its pass over them (:attr:`stage_passes`), the rescale and the
        subtraction."""
        out = self.geometry.out_dim
        return float(positions * (self.oft_blocks.numel() + out * (sum(self.stage_passes()) + 2)))

    def stage_passes(self) -> list[float]:
        """What each stage's pass over the activations costs per value, in full-size multiply-adds: the
        batched matmul of b-wide blocks and the layout copies around it are memory-bound (measured on a CPU,
        4096 positions × 768 channels, forward and backward: about 20 ms a stage against 48 ms for a
        768 × 768 matmul, so ≈ :data:`BLOCK_PASS`)."""
        return [BLOCK_PASS] * (self.oft_blocks.numel() // (self.geometry.out_dim * self.block_size))

    def rebuild_flops(self) -> float:
        """W's rows go through the same rotation code as the bypass's activations, as ``in · ∏k`` positions
        (:meth:`rotation_work`), plus the Cayley solves.  So a weight with fewer rows than the input has
        positions rebuilds cheaper than the bypass rotates (measured on a CPU: a 320-channel 3×3 conv, 2,880
        rows against 1,024 positions, took 39 ms to rebuild through BOFT's 6 stages, 12 ms to rotate)."""
        rows = math.prod(self.geometry.weight_shape) // self.geometry.out_dim
        return self.rotation_work(rows) + float(self.oft_blocks.numel() * self.block_size)

    # --- files ---------------------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, Tensor]:
        """``oft_blocks``, ``alpha`` = constraint and ``rescale`` (out, 1, …) at strength 1 only."""
        if self.multiplier != 1.0:
            raise FormatError(
                f"a {self.algorithm} adapter with multiplier ≠ 1 cannot be written exactly: the consumers scale "
                "each rotation (LyCORIS) or W' − W (ComfyUI) themselves, and no change of the blocks gives "
                "t · (W' − W); set the multiplier to 1 first"
            )
        wide = torch.float64 if self.param_dtype == torch.float64 else torch.float32
        out = {"oft_blocks": self.oft_blocks, "alpha": torch.tensor(float(self.constraint), dtype=wide)}
        if self.rescale is not None:
            out["rescale"] = self.rescale.reshape(-1, *([1] * (len(self.geometry.weight_shape) - 1)))
        return out

    @classmethod
    def claims(cls, params: dict[str, Tensor]) -> bool:
        """OFT's blocks are 3-D, BOFT's 4-D; a file with other shapes goes to OFT, whose reader names them."""
        blocks = params.get("oft_blocks")
        return blocks is not None and (blocks.dim() == 4) == (cls.blocks_ndim == 4)

    @classmethod
    def read_blocks(cls, params: dict[str, Tensor], geometry: LayerGeometry, where: str) -> Tensor:
        """``oft_blocks`` checked: square blocks of an even split of the layer's ``out`` rows."""
        blocks = params.get("oft_blocks")
        if blocks is None:
            raise FormatError(f"{where}: missing tensor 'oft_blocks'")
        shape = tuple(blocks.shape)
        if len(shape) != cls.blocks_ndim or shape[-1] != shape[-2] or shape[-3] * shape[-1] != geometry.out_dim:
            expected = "(n, b, b)" if cls.blocks_ndim == 3 else "(m, n, b, b)"
            out = geometry.out_dim
            raise FormatError(f"{where}: oft_blocks has shape {shape}, expected {expected} with n·b = {out}")
        return blocks

    @classmethod
    def read_rest(
        cls, params: dict[str, Tensor], geometry: LayerGeometry, where: str, blocks: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The state and options besides the block layout: ``rescale`` and ``alpha`` (the constraint)."""
        state = {"oft_blocks": blocks}
        rescale = params.get("rescale")
        if rescale is not None:
            if rescale.numel() != geometry.out_dim:
                expected = f"({geometry.out_dim}, 1, …)"
                raise FormatError(f"{where}: rescale has shape {tuple(rescale.shape)}, expected {expected}")
            state["rescale"] = rescale.reshape(-1)
        alpha = params.get("alpha")
        constraint = 0.0 if alpha is None else float(alpha.double().item())
        if constraint < 0:
            raise FormatError(f"{where}: alpha (the constraint) is {constraint}, expected ≥ 0")
        return state, dict(constraint=constraint, rescaled=rescale is not None, r=blocks.shape[-1])

    @classmethod
    def file_weight_shape(cls, params: dict[str, Tensor], where: str) -> tuple[tuple[int, ...], bool]:
        """Only out (n·b) is known; ``rescale`` (out, 1, …) tells how many kernel axes there are."""
        blocks = shape_of(params, "oft_blocks", where)
        if len(blocks) < 3:
            raise FormatError(f"{where}: oft_blocks has shape {blocks}, expected (n, b, b) or (m, n, b, b)")
        axes = len(params["rescale"].shape) if "rescale" in params else 2
        return (blocks[-3] * blocks[-1], *([1] * max(axes - 1, 1))), False

    # --- PEFT folders ----------------------------------------------------------------------------------
    def folder_refusal(self) -> str | None:
        return self.foreign_folder

    @classmethod
    def from_folder(
        cls, params: dict[str, Tensor], options: AdapterOptions, geometry: LayerGeometry | None
    ) -> dict[str, Tensor]:
        raise FormatError(cls.foreign_folder)

    # --- tools -----------------------------------------------------------------------------------------
    def consumer_caveats(self) -> list[str]:
        """ComfyUI caps ‖Q‖ at the file's alpha c itself, not at c · out as LyCORIS (and we) do."""
        q = self.oft_blocks.detach()
        if self.constraint > 0 and float((q - q.transpose(-1, -2)).norm()) + NORM_EPS > self.constraint:
            return [
                "ComfyUI caps the rotation's ‖Q‖ at the constraint c (the file's alpha) instead of c · out as "
                "LyCORIS does, so with ‖Q‖ above c its weights differ"
            ]
        return []

    def metadata_options(self) -> dict[str, Any]:
        return {"constraint": self.constraint, "rescaled": self.rescale is not None}

    @classmethod
    def kohya_args(cls, described: dict[str, Any]) -> dict[str, str]:
        args = {"algo": cls.algo_names[-1], "constraint": str(described.get("constraint", 0.0))}
        return {**args, "rescaled": str(bool(described.get("rescaled", False))).lower()}

    def summary_notes(self) -> list[str]:
        notes = [f"constraint {self.constraint:g}"] if self.constraint > 0 else []
        return notes + (["rescaled"] if self.rescale is not None else [])


class OFT(RotationAdapter):
    """Diag-OFT on Linear, Conv (any N-d), Embedding and transformers Conv1D."""

    algorithm = "oft"
    config_class = OFTConfig
    folder_type = "OFT"
    algo_names = ("oft", "diag-oft")
    extract_name = "oft"
    blocks_ndim = 3

    def block_shape(self) -> tuple[int, ...]:
        out, size = self.geometry.out_dim, self.options.oft_block_size
        if size:
            if size < 0 or out % size:
                raise ValueError(f"oft_block_size {size} does not divide the layer's {out} outputs")
            return (out // size, size, size)
        b, n = factorization(out, self.options.r)
        return (n, b, b)

    def rotate(self, y: Tensor, rotations: Tensor) -> Tensor:
        return rotate_blocks(y, rotations, transposed=True)

    def span(self) -> int:
        return self.block_size

    @classmethod
    def read_file(
        cls, params: dict[str, Tensor], geometry: LayerGeometry, where: str, rank_hint: tuple[int, float] | None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        blocks = cls.read_blocks(params, geometry, where)
        state, options = cls.read_rest(params, geometry, where, blocks)
        return state, {**options, "oft_block_size": blocks.shape[-1]}

    def unused_options(self) -> dict[str, str]:
        """Blocks of 1 (LyCORIS' factorization of e.g. 4 outputs with r = 4) never rotate: Q = B − Bᵀ = 0."""
        if self.block_size != 1:
            return {}
        return {
            "r": f"OFT with r={self.options.r} splits {self.geometry.out_dim} outputs into blocks of 1 (LyCORIS' "
            "factorization), which cannot rotate; set an r whose factorization has a smaller factor above 1, or "
            "oft_block_size"
        }

    def consumer_caveats(self) -> list[str]:
        """ComfyUI's OFT loader also ignores ``rescale``."""
        caveats = super().consumer_caveats()
        if self.rescale is not None and not bool((self.rescale.detach() == 1).all()):
            caveats.append("ComfyUI's OFT loader ignores rescale")
        return caveats

    def summary_notes(self) -> list[str]:
        n, b, _ = self.oft_blocks.shape
        return [f"{n} blocks × {b}", *super().summary_notes()]

    @classmethod
    def extracted(
        cls,
        geometry: LayerGeometry,
        delta: Tensor,
        delta_bias: Tensor | None,
        how: Extraction,
        base_weight: Tensor | None = None,
    ) -> Adapter | None:
        """``W + ΔW ≈ s ⊙ (blockdiag(Rᵀ) W)`` with proper block rotations R and a rescale s per output row:
        alternately the rotation nearest ``s⁻¹ ⊙ (W + ΔW)`` per block (orthogonal Procrustes, det +1) and the
        least-squares s for it, which recovers an exact rotation-and-rescale.  The block size is LyCORIS'
        factorization of out with ``--factor`` (default 8).  Needs the base weight W; a block rotation by a half
        turn (eigenvalue −1) has no Cayley form and comes out inexact."""
        if base_weight is None:
            raise ValueError("OFT extraction needs the base weight (a rotation of W)")
        b, n = factorization(geometry.out_dim, how.factor if how.factor > 0 else 8)
        w = base_weight.double().reshape(n, b, -1)
        target = (base_weight.double() + delta.double()).reshape(n, b, -1)
        scale = torch.ones(n, b, 1, dtype=torch.float64, device=w.device)
        for _ in range(_EXTRACT_ROUNDS):
            # rows M W with M = Rᵀ: Procrustes of (T / s) Wᵀ gives M, so R = Mᵀ
            rotations = nearest_rotation((target / scale) @ w.transpose(1, 2)).transpose(1, 2)
            rotated = torch.einsum("kji,kj...->ki...", rotations, w)
            scale = (rotated * target).sum(-1, keepdim=True) / (rotated * rotated).sum(-1, keepdim=True).clamp_min(
                1e-30
            )
        options = AdapterOptions(r=b, oft_block_size=b, rescaled=True)
        values = {"oft_blocks": inverse_cayley(rotations).float(), "rescale": scale.reshape(-1).float()}
        return cls.with_values(geometry, options, values)
