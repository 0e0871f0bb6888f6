"""Adapter configurations: PEFT's field names, validated on construction, JSON round trip.

One dataclass per algorithm.  ``lora_alpha`` (and ``lora_dropout``, ``init_lora_weights``,
``init_ia3_weights``) are accepted as aliases so PEFT-style code runs unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .algorithms.base import AdapterOptions

CONFIG_NAME = "adapter_config.json"
_ALIASES = {
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "init_lora_weights": "init_weights",
    "init_ia3_weights": "init_weights",
}


@dataclass(kw_only=True)
class AdapterConfig:
    """Fields every algorithm shares.

    Attributes:
        target_modules: module names to adapt: a list (exact name or dotted suffix, e.g. ``"query"``
            matches ``encoder.layer.0.attention.self.query``), a regex string matched against the whole
            name, or ``"all-linear"`` (every Linear / Conv1D except the output layer).
        exclude_modules: the same forms; matching modules are never adapted.
        modules_to_save: modules (name or dotted suffix) trained in full as a copy next to the original.
        layers_to_transform: only adapt these layer indices (the number after ``layers_pattern``).
        layers_pattern: the module-list name holding the layers (default: layers, h, block, blocks, layer).
        init_weights: True: the adapter starts as the identity; "lycoris": identity with LyCORIS' choice
            of the zero factor; False: every factor random (not the identity).
        module_dropout: probability of skipping the whole adapter for one training forward.
        inference_mode: load frozen (no parameter requires grad).
        forward_mode: "auto" (cost model), "bypass" (never build ΔW where possible) or "combined"
            (one op with W + ΔW).
        backward_memory: what training keeps for backward: "auto" (the bypass recomputes what is cheap to
            recompute and keeps a rank-sized input-side intermediate where recomputing it costs time; the
            combined path, where the cost model picks it, keeps W + ΔW) or "lean" (no more than a rank-r
            LoRA keeps: the layer input and rank-r values per position; the cost model then never picks a
            full-size W + ΔW in training, which forward_mode="combined" and adapter sets without an exact
            bypass still train through).
    """

    peft_type: ClassVar[str]
    algorithm: ClassVar[str]

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    init_weights: bool | str = True
    module_dropout: float = 0.0
    inference_mode: bool = False
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    forward_mode: str = "auto"
    backward_memory: str = "auto"

    def __post_init__(self) -> None:
        if self.init_weights not in (True, False, "lycoris"):
            raise ValueError(f"init_weights must be True, False or 'lycoris', got {self.init_weights!r}")
        if not 0.0 <= self.module_dropout < 1.0:
            raise ValueError(f"module_dropout must be in [0, 1), got {self.module_dropout}")
        if self.forward_mode not in ("auto", "bypass", "combined"):
            raise ValueError(f"forward_mode must be 'auto', 'bypass' or 'combined', got {self.forward_mode!r}")
        if self.backward_memory not in ("auto", "lean"):
            raise ValueError(f"backward_memory must be 'auto' or 'lean', got {self.backward_memory!r}")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (set, tuple)):
                setattr(self, name, sorted(value))
            elif value is not None and not isinstance(value, (str, list)):
                raise TypeError(f"{name} must be a list of names or a regex string, got {type(value).__name__}")
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]

    # --- per-module options --------------------------------------------------------------------
    def options_for(self, module_name: str) -> AdapterOptions:
        """The adapter options for one module (rank/alpha patterns resolved)."""
        return AdapterOptions(init_weights=self.init_weights, module_dropout=self.module_dropout)

    # --- serialization ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _ALIASES}
        return {"peft_type": self.peft_type, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """Build the config class named by ``data["peft_type"]``; unknown fields are an error naming them."""
        data = dict(data)
        peft_type = data.pop("peft_type", None)
        target = cls if peft_type is None else config_class(peft_type)
        known = {f.name for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {target.__name__} field(s): {', '.join(unknown)}")
        return target(**{k: v for k, v in data.items() if k in known})

    def save(self, directory: str | Path) -> None:
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path) -> AdapterConfig:
        return cls.from_dict(read_config_json(directory))


def read_config_json(directory: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a folder; a missing or malformed file raises naming it."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """The value of the first pattern that matches ``module_name`` (whole name or a dotted suffix)."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module_name):
            return value
    return default


@dataclass(kw_only=True)
class RankConfig(AdapterConfig):
    """Fields of the low-rank algorithms.

    Attributes:
        r: rank.  alpha: scale numerator, ΔW is scaled by alpha / r (alias ``lora_alpha``).
        use_rslora: scale by alpha / √r instead.
        rank_dropout: probability of dropping each rank component in a training forward.
        rank_dropout_scale: rescale kept components by 1 / (1 − rank_dropout).
        rank_pattern / alpha_pattern: regex (whole name or dotted suffix) → r / alpha for matching modules.
        use_dora: DoRA weight decomposition (magnitude per output channel unless ``dora_on_output=False``).
    """

    r: int = 8
    alpha: float | None = None
    lora_alpha: float | None = field(default=None, repr=False)
    use_rslora: bool = False
    rank_dropout: float = 0.0
    rank_dropout_scale: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    dora_on_output: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lora_alpha is not None:
            if self.alpha is not None and self.alpha != self.lora_alpha:
                raise ValueError(f"alpha={self.alpha} and lora_alpha={self.lora_alpha} disagree; give one")
            self.alpha, self.lora_alpha = self.lora_alpha, None
        if self.alpha is None:
            self.alpha = float(self.r)
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.rank_dropout < 1.0:
            raise ValueError(f"rank_dropout must be in [0, 1), got {self.rank_dropout}")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {value!r}")

    def options_for(self, module_name: str) -> AdapterOptions:
        return dataclasses.replace(
            super().options_for(module_name),
            r=_pattern_value(self.rank_pattern, module_name, self.r),
            alpha=float(_pattern_value(self.alpha_pattern, module_name, self.alpha)),
            use_rslora=self.use_rslora,
            rank_dropout=self.rank_dropout,
            rank_dropout_scale=self.rank_dropout_scale,
            use_dora=self.use_dora,
            dora_on_output=self.dora_on_output,
        )


@dataclass(kw_only=True)
class LoraConfig(RankConfig):
    """LoRA / LoCon.  ``use_effective_conv2d``: Tucker core for k×k convs; ``dropout`` (alias
    ``lora_dropout``): dropout on the adapter's input."""

    peft_type: ClassVar[str] = "LORA"
    algorithm: ClassVar[str] = "lora"
    use_effective_conv2d: bool = False
    dropout: float = 0.0
    lora_dropout: float | None = field(default=None, repr=False)
    init_lora_weights: bool | str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.lora_dropout is not None:
            self.dropout, self.lora_dropout = self.lora_dropout, None
        if self.init_lora_weights is not None:
            self.init_weights, self.init_lora_weights = self.init_lora_weights, None
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def options_for(self, module_name: str) -> AdapterOptions:
        return dataclasses.replace(
            super().options_for(module_name), use_effective_conv2d=self.use_effective_conv2d, dropout=self.dropout
        )


@dataclass(kw_only=True)
class LoHaConfig(RankConfig):
    """LoHa.  ``use_effective_conv2d``: Tucker cores for k×k convs."""

    peft_type: ClassVar[str] = "LOHA"
    algorithm: ClassVar[str] = "loha"
    use_effective_conv2d: bool = False

    def options_for(self, module_name: str) -> AdapterOptions:
        return dataclasses.replace(super().options_for(module_name), use_effective_conv2d=self.use_effective_conv2d)


@dataclass(kw_only=True)
class LoKrConfig(RankConfig):
    """LoKr.

    Attributes:
        decompose_factor: the cap on the smaller Kronecker factor (−1: as balanced as possible).
        decompose_both: also decompose W1 into a rank-r product when r < max(W1 dims)/2.
        unbalanced_factorization: swap the output factors (W1 gets the larger one).
        use_effective_conv2d: Tucker core ``lokr_t2`` for k×k convs.
    """

    peft_type: ClassVar[str] = "LOKR"
    algorithm: ClassVar[str] = "lokr"
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    unbalanced_factorization: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise ValueError(f"decompose_factor must be -1 or a positive integer, got {self.decompose_factor}")

    def options_for(self, module_name: str) -> AdapterOptions:
        return dataclasses.replace(
            super().options_for(module_name),
            use_effective_conv2d=self.use_effective_conv2d,
            decompose_both=self.decompose_both,
            decompose_factor=self.decompose_factor,
            unbalanced_factorization=self.unbalanced_factorization,
        )


@dataclass(kw_only=True)
class DyLoraConfig(RankConfig):
    """DyLoRA: LoRA of rank ``r`` trained ``block_size`` ranks at a time."""

    peft_type: ClassVar[str] = "DYLORA"
    algorithm: ClassVar[str] = "dylora"
    block_size: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.block_size <= 0 or self.r % self.block_size:
            raise ValueError(f"r ({self.r}) must be a positive multiple of block_size ({self.block_size})")

    def options_for(self, module_name: str) -> AdapterOptions:
        return dataclasses.replace(super().options_for(module_name), block_size=self.block_size)


@dataclass(kw_only=True)
class IA3Config(AdapterConfig):
    """(IA)³.  ``feedforward_modules`` (a subset of the targets, same forms) scale their input channels."""

    peft_type: ClassVar[str] = "IA3"
    algorithm: ClassVar[str] = "ia3"
    feedforward_modules: list[str] | str | None = None
    init_ia3_weights: bool | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.init_ia3_weights is not None:
            self.init_weights, self.init_ia3_weights = self.init_ia3_weights, None
        super().__post_init__()

    def options_for(self, module_name: str) -> AdapterOptions:
        from .host.targeting import name_matches

        on_input = self.feedforward_modules is not None and name_matches(module_name, self.feedforward_modules)
        return dataclasses.replace(super().options_for(module_name), on_input=on_input)


@dataclass(kw_only=True)
class FullConfig(AdapterConfig):
    """Full fine-tuning of the targeted weights, stored as a difference (LyCORIS ``full``)."""

    peft_type: ClassVar[str] = "FULL"
    algorithm: ClassVar[str] = "full"


@dataclass(kw_only=True)
class NormConfig(AdapterConfig):
    """Tuning of LayerNorm / GroupNorm weights and biases; with no ``target_modules`` every norm layer."""

    peft_type: ClassVar[str] = "NORM"
    algorithm: ClassVar[str] = "norm"


@dataclass(kw_only=True)
class SingleFileConfig(AdapterConfig):
    """An adapter read from a single file: its modules (possibly of several algorithms) come from the file."""

    peft_type: ClassVar[str] = "SINGLE_FILE"
    algorithm: ClassVar[str] = "mixed"
    source: str = ""


CONFIG_CLASSES: dict[str, type[AdapterConfig]] = {
    c.peft_type: c for c in (LoraConfig, LoHaConfig, LoKrConfig, DyLoraConfig, IA3Config, FullConfig, NormConfig)
}


def config_class(peft_type: str) -> type[AdapterConfig]:
    """The config class for a ``peft_type`` string such as ``"LOKR"``."""
    try:
        return CONFIG_CLASSES[peft_type.upper()]
    except KeyError:
        raise ValueError(f"unknown peft_type {peft_type!r}; known: {', '.join(CONFIG_CLASSES)}") from None
