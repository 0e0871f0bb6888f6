"""The adapter contract shared by every algorithm.

An :class:`Adapter` owns its parameters and computes, for one base layer of a known geometry:

- :meth:`Adapter.delta_weight` — the one source of truth for ΔW, canonical shape ``(out, in, *kernel)``,
  already multiplied by the adapter's scale (``alpha / r``) and by an optional ``factor`` (the layer
  passes the multiplier);
- optionally :meth:`Adapter.bypass` — ``ΔW · x`` computed without building ΔW (tested equal to
  applying :meth:`delta_weight` with the base layer's operation);
- optionally :meth:`Adapter.delta_bias` — a bias delta (Full, Norm).

Training randomness (rank dropout masks, DyLoRA's rank block) is drawn once per forward by
:meth:`Adapter.draw` and handed to both paths, so either path gives the same result for the same draw.

An algorithm is one room: besides the math, its class says how its modules look in a single file
(:meth:`Adapter.file_tensors`, :meth:`Adapter.read_file`, :meth:`Adapter.file_weight_shape`; a fused layer's
row blocks: :meth:`Adapter.split_file_rows`, :meth:`Adapter.join_file_rows`), in a PEFT
folder (:meth:`Adapter.folder_tensors`, :meth:`Adapter.from_folder`, :meth:`Adapter.folder_config`, or the
reason PEFT computes something else), in ``inspect`` (:meth:`Adapter.summary_notes`) and in kohya's
metadata (:meth:`Adapter.kohya_args`).  Subclasses that name an ``algorithm`` register themselves in
:data:`REGISTRY`; formats, tools and integrations look algorithms up there, never by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import FormatError
from ..ops.geometry import Kind, LayerGeometry
from .common import AdapterOptions, Extraction, adapter_dtype
from .dora import dora_caveats, dora_delta, dora_output, weight_norm

DENSE_KINDS: frozenset[Kind] = frozenset({"linear", "conv", "embedding", "hf_conv1d"})

#: every algorithm by name, in the order their modules were imported
REGISTRY: dict[str, type[Adapter]] = {}


class Adapter(nn.Module):
    """Base class; see the module docstring for the contract."""

    algorithm: ClassVar[str]
    supported_kinds: ClassVar[frozenset[Kind]] = DENSE_KINDS
    #: ΔW itself is a function of the base weight ((IA)³: W ⊙ v); see :attr:`depends_on_base`
    scales_base: ClassVar[bool] = False
    #: the bypass multiplies by the base weight itself (OFT: ``(R − I)·W x``; GLoRA: ``W·(A x)``), so it is
    #: computed by :meth:`base_bypass` and needs nothing merged into W
    bypass_uses_base: ClassVar[bool] = False
    #: part of ΔW is W·A with A a per-position map of the input, which the layer can fold into its base call's
    #: input (:meth:`input_shift`) when nothing else needs that call on the plain input
    shifts_input: ClassVar[bool] = False
    #: whether ``r``/``alpha`` mean anything for this algorithm
    has_rank: ClassVar[bool] = True
    #: the config dataclass (PEFT field names) that builds this algorithm's adapters
    config_class: ClassVar[type]
    #: the algorithm whose single-file tensors this one reads and writes (itself, unless it is a training
    #: variant of another: DyLoRA is a LoRA in files)
    file_family: ClassVar[str]
    #: the tensor names one module of this algorithm may carry in a single file (besides ``alpha`` and
    #: ``dora_scale``); a module holding any of them is recognised as this algorithm
    file_keys: ClassVar[frozenset[str]] = frozenset()
    #: why PEFT's folders of :attr:`folder_type` compute another function than this algorithm (they are then
    #: refused on load, naming it); ``None`` where PEFT's tuner of that name is this algorithm
    foreign_folder: ClassVar[str | None] = None
    #: ``peft_type`` of this algorithm's PEFT folders, and the tensor names a module carries there
    folder_type: ClassVar[str]
    folder_keys: ClassVar[frozenset[str]] = frozenset()
    #: whether ``beyondlora resize`` re-factorizes this algorithm's ΔW at another rank (as a LoRA)
    resizable: ClassVar[bool] = False
    #: the names ``beyondlora train --algo`` and kohya's ``algo=`` network arg accept for this algorithm
    algo_names: ClassVar[tuple[str, ...]] = ()
    #: the parameters on ΔW's output side, which LoRA+ trains at a higher learning rate (LoRA's ``up``)
    output_factors: ClassVar[frozenset[str]] = frozenset()
    #: whether kohya's ``use_scalar`` (a trainable scalar on ΔW, see :meth:`scalar_factor`) applies
    supports_scalar: ClassVar[bool] = False
    #: the ``beyondlora extract --algo`` name that approximates a difference with this algorithm (``None``: none)
    extract_name: ClassVar[str | None] = None
    #: whether this algorithm holds a weight difference exactly (``extract --mode full``, and layers a
    #: low-rank form would not make smaller, are stored with it)
    stores_difference: ClassVar[bool] = False
    #: :class:`AdapterOptions` fields that change the output but have no tensor in a single file: our metadata
    #: records them (:meth:`metadata_options`) and a reload restores them; a file without that record (LyCORIS,
    #: kohya) gets the field's default, the single-file format's own meaning
    recorded_options: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "algorithm" in cls.__dict__:
            if "file_family" not in cls.__dict__:
                cls.file_family = cls.algorithm
            REGISTRY[cls.algorithm] = cls

    def __init__(self, geometry: LayerGeometry, options: AdapterOptions, base_weight: Tensor) -> None:
        super().__init__()
        if geometry.kind not in self.supported_kinds:
            raise TypeError(f"{self.algorithm} cannot adapt a {geometry.kind} layer")
        if self.has_rank and options.r <= 0:
            raise ValueError(f"r must be positive, got {options.r}")
        for name in ("rank_dropout", "module_dropout", "dropout"):
            value = getattr(options, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        self.geometry = geometry
        self.options = options
        self.multiplier = 1.0
        self.dora_scale: nn.Parameter | None = None
        if options.use_dora:
            if geometry.is_norm or geometry.kind == "embedding":
                raise TypeError(f"DoRA needs a weight matrix; a {geometry.kind} layer has none to decompose")
            weight = base_weight.detach().to(adapter_dtype(base_weight))
            self.dora_scale = nn.Parameter(weight_norm(weight, options.dora_on_output))

    # --- hyper-parameters --------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.options.r

    @property
    def alpha(self) -> float:
        return self.options.alpha

    @property
    def scale(self) -> float:
        """``alpha / r`` (rs-LoRA: ``alpha / √r``); 1 for adapters without a rank."""
        return self.scale_at(self.rank) if self.has_rank else 1.0

    def scale_at(self, rank: int) -> float:
        """The scale of this adapter cut to ``rank``: ``alpha / rank`` (rs-LoRA: ``alpha / √rank``)."""
        return self.alpha / (math.sqrt(rank) if self.options.use_rslora else rank)

    @property
    def param_dtype(self) -> torch.dtype:
        # the own parameters first: ``parameters()`` walks a generator, ~15 µs a call, on every forward
        for p in self._parameters.values():
            if p is not None:
                return p.dtype
        return next(self.parameters()).dtype

    # --- randomness --------------------------------------------------------------------------------
    def draw(self) -> Any:
        """Training-time randomness for one forward; ``None`` when there is none (or in eval)."""
        return None

    def rank_mask(self, size: int) -> Tensor | None:
        """Keep-mask over ``size`` rank components for rank dropout, or ``None`` when inactive.

        With ``rank_dropout_scale`` the kept components are scaled by 1 / (1 − p).
        """
        p = self.options.rank_dropout
        if not self.training or p == 0.0:
            return None
        device = next(self.parameters()).device
        mask = (torch.rand(size, device=device) >= p).to(self.param_dtype)
        return mask / (1.0 - p) if self.options.rank_dropout_scale else mask

    # --- the math ------------------------------------------------------------------------------------
    def delta_weight(self, base_weight: Tensor, draw: Any = None, factor: float = 1.0) -> Tensor:
        """ΔW in canonical shape times the scale and ``factor``; ``base_weight`` is the canonical base weight.

        Algorithms fold ``scale · factor`` into their smallest tensor, so a multiplier never costs a pass
        over the full-size ΔW.
        """
        raise NotImplementedError

    def add_delta(self, weight: Tensor, base_weight: Tensor, draw: Any = None, multiplier: float = 1.0) -> Tensor:
        """``weight + multiplier · ΔW`` as a new tensor (canonical shape), what the combined path runs with;
        ``base_weight`` as in :meth:`delta_weight`.  Adapters whose ΔW is a product fold the sum into the
        product's own pass where that keeps no more for backward than the plain sum (the default)."""
        return weight + self.delta_weight(base_weight, draw, factor=multiplier)

    def delta_bias(self, base_bias: Tensor | None = None) -> Tensor | None:
        """Bias delta of shape (out,), or ``None``; ``base_bias`` (out,) is the layer's own bias, which the delta
        of an adapter that scales it needs ((IA)³ with ``scale_bias``: ``b ⊙ v``)."""
        return None

    def bypass(self, x: Tensor, draw: Any = None) -> Tensor | None:
        """``ΔW · x`` (times the scale) without building ΔW, or ``None`` when this layer has no such path."""
        if self.geometry.kind == "conv":
            return self.conv_bypass(x, draw)
        parts = self.bypass_parts(x, draw)
        if parts is None:
            return None
        hidden, up, scale = parts
        lead = x.shape if self.geometry.kind == "embedding" else x.shape[:-1]
        return F.linear(hidden, up * scale).reshape(*lead, self.geometry.out_dim)

    def add_bypass(
        self, result: Tensor, x: Tensor, draw: Any = None, multiplier: float = 1.0, lean: bool = False
    ) -> Tensor | None:
        """``result + multiplier · ΔW · x`` (times the scale) in one autograd node that saves ``x`` and the
        factors for backward, plus at most one rank-sized intermediate whose recomputation measurably costs
        time (a convolution; LoKr's grouped projection ``X w2_bᵀ``); with ``lean`` not even that (it is
        recomputed in backward).
        ``None`` when this adapter has no such path here (the layer then adds :meth:`bypass`'s output).
        ``x`` is the layer's own input, in its own dtype."""
        return None

    def bypass_parts(self, x: Tensor, draw: Any = None) -> tuple[Tensor, Tensor, float] | None:
        """Linear-like layers: ``(hidden, up, scale)`` with ``ΔW · x = scale · hidden @ upᵀ``.

        ``hidden`` (…, R) reshaped to rows of R lines up with the output (…, out) reshaped to rows of
        ``up.shape[0]``, so the layer can add the product with one fused ``addmm``.
        """
        return None

    def conv_bypass(self, x: Tensor, draw: Any = None) -> Tensor | None:
        """Convolutions: ``ΔW ⊛ x`` (times the scale) without building ΔW, or ``None``."""
        return None

    def base_bypass(self, x: Tensor, apply_base: Callable[[Tensor], Tensor], draw: Any = None) -> Tensor | None:
        """``ΔW · x`` (times the scale) for an adapter whose ΔW multiplies the base weight
        (:attr:`bypass_uses_base`), given ``apply_base(z)`` = ``W z``: the base operation without its bias on any
        ``z`` shaped like ``x`` (``apply_base(x)`` is free: the layer has computed it already).  ``None`` when
        this layer has no such path."""
        return None

    def transform_output(self, out: Tensor, bias: Tensor | None, draw: Any = None) -> Tensor | None:
        """``W' x + b`` straight from the base output ``out`` = ``W x + b`` (``bias``: the base layer's b or
        ``None``) for an adapter whose W' maps W's rows (OFT, BOFT: ``rescale ⊙ M W``): one pass over the output
        where forming ``ΔW x`` and adding it takes three.  The layer takes it for such an adapter alone on its
        layer; ``None`` where it has none."""
        return None

    def input_shift(self, x: Tensor, draw: Any = None, with_rest: bool = True) -> tuple[Tensor, Tensor | None] | None:
        """``(s · A x, s · B x)`` for an adapter whose ΔW = s · (W·A + B) with A acting on each position's input
        channels (GLoRA; :attr:`shifts_input`): the layer then folds the first into the base call it makes
        anyway, ``W (x + t · s · A x) + b``, and adds ``t · s · B x`` (``None`` without ``with_rest``: the
        layer rebuilding the base call's input for backward needs only A x).  ``None`` when this layer has no
        such form (the layer then takes :meth:`base_bypass`)."""
        return None

    def has_merged_step(self) -> bool:
        """Whether :meth:`merged_step` exists for this adapter on this layer."""
        return False

    def merged_step(
        self, x: Tensor, weight: Tensor, bias: Tensor | None, draw: Any = None, multiplier: float = 1.0
    ) -> Tensor | None:
        """Linear-like layers in training: ``x (W + t · ΔW)ᵀ + b`` as one matrix product whose backward gives the
        factors their gradients through the adapter's rank-sized route, never the full-size gradient of
        W + ΔW.  ``weight`` is the canonical (out, in) W; x, W and the factors share one dtype; ``None`` where
        the adapter has no such path (:meth:`has_merged_step`)."""
        return None

    def bypass_flops(self, tokens: int) -> float:
        """Multiply-adds of :meth:`bypass` for ``tokens`` positions (forward only)."""
        return math.inf

    def rebuild_flops(self) -> float:
        """Multiply-adds of :meth:`delta_weight`."""
        return float(math.prod(self.geometry.weight_shape))

    def needs_bypass(self) -> bool:
        """Whether this forward must take the bypass path (input dropout exists only there)."""
        return False

    # --- how the host layer applies it ---------------------------------------------------------------
    def channel_scaling(self) -> tuple[Tensor, bool, bool] | None:
        """``(v, on_input, with_bias)`` for an adapter that only scales the base layer's channels,
        ``W' = W ⊙ (1 + t·v)`` along the input (``on_input``) or output axis, and with ``with_bias`` (output side
        only) the bias too, ``b' = b ⊙ (1 + t·v)``: the layer folds ``1 + t·v`` into the base call's input or
        output instead of running a bypass.  ``None`` for every other adapter."""
        return None

    @property
    def decomposed(self) -> bool:
        """Whether DoRA's weight decomposition applies: ``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖``."""
        return self.dora_scale is not None

    @property
    def reads_base_output(self) -> bool:
        """Whether this adapter's bypass reads the base layer's own output ``W x`` (DoRA; output-side scaling),
        which exists only while nothing is merged into W and the base call's input is the layer's input."""
        scaling = self.channel_scaling()
        return self.decomposed or self.bypass_uses_base or (scaling is not None and not scaling[1])

    def has_exact_bypass(self) -> bool:
        """Whether the bypass path computes this adapter exactly on its layer (DoRA on the input axis has none:
        its norm per input channel does not factor through the output)."""
        if self.decomposed and not self.options.dora_on_output:
            return False
        return self.channel_scaling() is not None or self.bypass_flops(1) != math.inf

    def effective_delta(
        self, base_weight: Tensor, draw: Any = None, multiplier: float | None = None, base_bias: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """What this adapter adds to the weight and the bias: ``(t · ΔW, t · Δb)``, with DoRA
        ``t · (W' − W)`` (:func:`.dora.dora_delta`); t is the adapter's multiplier unless given.
        ``base_weight`` is the canonical base weight, in the adapter's dtype; ``base_bias`` the layer's bias
        (see :meth:`delta_bias`)."""
        t = self.multiplier if multiplier is None else multiplier
        if self.decomposed:
            delta = dora_delta(
                base_weight, self.delta_weight(base_weight, draw), self.dora_scale, self.options.dora_on_output, t
            )
        else:
            delta = self.delta_weight(base_weight, draw, factor=t)
        return delta, self.effective_delta_bias(t, base_bias)

    def effective_delta_bias(self, multiplier: float | None = None, base_bias: Tensor | None = None) -> Tensor | None:
        """``t · Δb``, or ``None`` for an adapter that leaves the bias alone (``base_bias``: :meth:`delta_bias`)."""
        bias = self.delta_bias(base_bias)
        t = self.multiplier if multiplier is None else multiplier
        return None if bias is None else bias * t

    def add_effective_delta(self, weight: Tensor, base_weight: Tensor, draw: Any = None) -> Tensor:
        """``weight`` plus what this adapter adds at its multiplier (the combined path): W + t · ΔW in the
        adapter's own pass where it has one (:meth:`add_delta`), with DoRA its decomposed delta."""
        if self.decomposed:
            return weight + self.effective_delta(base_weight, draw)[0]
        return self.add_delta(weight, base_weight, draw, self.multiplier)

    @property
    def depends_on_base(self) -> bool:
        """Whether what this adapter adds depends on the base weight or bias ((IA)³, DoRA): merging must then remember
        the delta it added (it cannot be recomputed from the merged weight), and its norm needs the base."""
        return self.scales_base or self.decomposed

    def decomposed_output(self, plain_out: Tensor, delta_out: Tensor, base_weight: Tensor, draw: Any = None) -> Tensor:
        """DoRA's bypass: ``W' x − W x`` from ``plain_out`` = W x (no bias) and ``delta_out`` = ΔW x
        (:func:`.dora.dora_output`); ``base_weight`` is W in the adapter's dtype."""
        merged = base_weight + self.delta_weight(base_weight, draw)
        return dora_output(plain_out, delta_out, merged, self.dora_scale, self.geometry)

    # --- files ---------------------------------------------------------------------------------------
    def file_tensors(self) -> dict[str, Tensor]:
        """This module's single-file tensors (names without the module key, ``dora_scale`` apart), written at
        the current multiplier so that the consumers' formula (:mod:`.codec`) gives exactly our ΔW."""
        raise NotImplementedError

    @classmethod
    def read_file(
        cls, params: dict[str, Tensor], geometry: LayerGeometry, where: str, rank_hint: tuple[int, float] | None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """``(parameter tensors, AdapterOptions fields)`` for one module's single-file tensors, every shape
        inferred from the tensors and checked against ``geometry`` (``where`` names the module in errors).
        ``rank_hint`` = (r, alpha) is the rank and alpha to use where the tensors carry none."""
        raise NotImplementedError

    @classmethod
    def file_weight_shape(cls, params: dict[str, Tensor], where: str) -> tuple[tuple[int, ...], bool]:
        """The canonical weight shape ``(out, in, *kernel)`` one module's single-file tensors imply, and
        whether the layer has a bias; sizes the tensors do not fix are 1, a kernel they flatten into the
        input stays flattened (see :meth:`file_folds_kernel`)."""
        raise NotImplementedError

    @classmethod
    def claims(cls, params: dict[str, Tensor]) -> bool:
        """Whether one module's single-file tensors are this algorithm's, where algorithms share tensor names
        (OFT and BOFT both write ``oft_blocks``, 3-D and 4-D); the name match decides among those that claim."""
        return True

    def file_folds_kernel(self) -> bool:
        """Whether this module's single-file tensors flatten a conv kernel into the input size (so a file
        read without its base model sees (out, in·k))."""
        return False

    @classmethod
    def split_file_rows(cls, params: dict[str, Tensor], sizes: Sequence[int], where: str) -> list[dict[str, Tensor]]:
        """One fused linear module's single-file tensors as the single-file tensors of the layers it stacks.

        The fused weight (Σ sizes, in) is ``[W_1; W_2; …]`` with ``W_i`` of ``sizes[i]`` rows; part i's
        consumer ΔW must equal rows ``[o_i, o_i + sizes[i])`` of the fused module's consumer ΔW exactly.
        Raises :class:`FormatError` naming ``where`` and the reason where this algorithm's parts cannot be
        written exactly in its own form (the default: no row split is known for it)."""
        raise FormatError(f"{where}: a {cls.algorithm} module cannot be split into the layers it fuses {list(sizes)}")

    @classmethod
    def join_file_rows(
        cls, parts: Sequence[dict[str, Tensor] | None], sizes: Sequence[int], where: str
    ) -> dict[str, Tensor]:
        """The reverse of :meth:`split_file_rows`: the single-file tensors of one fused module whose consumer
        ΔW is ``[ΔW_1; ΔW_2; …]`` exactly, from the layers' tensors (a ``None`` part has ΔW_i = 0 on its
        ``sizes[i]`` rows).  Raises :class:`FormatError` naming ``where`` and the reason where no module of this
        algorithm holds that stack."""
        raise FormatError(f"{where}: {cls.algorithm} modules cannot be joined into one fused module")

    # --- PEFT folders ----------------------------------------------------------------------------------
    def folder_refusal(self) -> str | None:
        """Why PEFT would compute something other than this adapter from its folder, or ``None``."""
        return None

    def folder_tensors(self) -> dict[str, Tensor]:
        """This module's tensors under the folder's names (without the ``base_model.model.<path>.`` prefix)."""
        raise NotImplementedError

    @classmethod
    def folder_config(cls, adapters: dict[str, Adapter], fields: dict[str, Any]) -> dict[str, Any]:
        """``adapter_config.json`` for these adapters (module name → adapter), from the ``fields`` every
        folder shares (for ranked algorithms also ``r``, ``rank_pattern``, ``alpha`` and ``alpha_pattern``
        expressing scale × multiplier exactly as alpha / r)."""
        return fields

    @classmethod
    def from_folder(
        cls, params: dict[str, Tensor], options: AdapterOptions, geometry: LayerGeometry | None
    ) -> dict[str, Tensor]:
        """One module's folder tensors as the single-file tensors :meth:`read_file` reads (with ``alpha``),
        given the options its ``adapter_config.json`` gives the module; raises :class:`FormatError` where
        the folder's meaning cannot be reproduced on this layer (``geometry``; ``None``: not checked)."""
        return params

    # --- tools -----------------------------------------------------------------------------------------
    @classmethod
    def with_values(cls, geometry: LayerGeometry, options: AdapterOptions, values: dict[str, Tensor]) -> Adapter:
        """An adapter on ``geometry`` whose parameters hold ``values`` (reshaped to each parameter's shape)."""
        standin = torch.zeros((), dtype=torch.float32).expand(geometry.weight_shape)
        adapter = cls(geometry, options, standin)
        own = dict(adapter.named_parameters())
        with torch.no_grad():
            for name, value in values.items():
                own[name].copy_(value.reshape(own[name].shape))
        return adapter

    @classmethod
    def extracted(
        cls,
        geometry: LayerGeometry,
        delta: Tensor,
        delta_bias: Tensor | None,
        how: Extraction,
        base_weight: Tensor | None = None,
    ) -> Adapter | None:
        """An adapter approximating the weight difference ``delta`` (canonical shape) and, where the
        algorithm holds one, ``delta_bias`` (out,), with alpha = rank (scale 1); ``None`` where this form
        would store no fewer parameters than ``delta`` itself.  ``base_weight`` (canonical W) is given for
        algorithms whose ΔW is a function of W (OFT)."""
        raise NotImplementedError

    def unused_options(self) -> dict[str, str]:
        """Options this adapter was given that have no effect on it: the option's config field (``"r"``) →
        a sentence saying what to set instead; empty when every option acts."""
        return {}

    def consumer_caveats(self) -> list[str]:
        """What the Stable Diffusion UIs (ComfyUI, AUTOMATIC1111) do with this module's single-file tensors where
        it is not our ΔW; empty where both apply them exactly."""
        return dora_caveats(self.options.dora_on_output) if self.decomposed else []

    def consumer_rank(self) -> int | None:
        """The rank a consumer reads from the file (its scale is alpha / rank), ``None`` when there is none."""
        return self.rank if self.has_rank else None

    def metadata_options(self) -> dict[str, Any]:
        """Hyper-parameters beyond r and alpha that our metadata records for this module (and
        :meth:`kohya_args` reads back), e.g. OFT's constraint."""
        return {}

    def summary_notes(self) -> list[str]:
        """Short notes on this adapter's form for ``inspect`` (Tucker, factor shapes, …)."""
        return ["tucker"] if getattr(self, "tucker", False) else []

    @classmethod
    def kohya_args(cls, described: dict[str, Any]) -> dict[str, str]:
        """kohya's ``ss_network_args`` entries for a file of this algorithm, from one module's metadata record."""
        return {}

    def scalar_factor(self) -> nn.Parameter:
        """The factor that absorbs kohya's ``use_scalar`` scalar when saving (ΔW is linear in it)."""
        raise TypeError(f"{self.algorithm} has no use_scalar")

    def lora_factors(self) -> tuple[Tensor, Tensor, float] | None:
        """``(up (out, r), down (r, in·∏k), scale)`` when ΔW is the plain product ``scale · up @ down`` (the
        form diffusers' LoRA files and ``resize`` handle), else ``None``."""
        return None

    def extra_repr(self) -> str:
        if self.has_rank:
            return f"r={self.rank}, alpha={self.alpha}, multiplier={self.multiplier}"
        return f"multiplier={self.multiplier}"
