"""The config dataclasses every algorithm's config builds on: PEFT's field names, validated on construction,
JSON round trip, and the module-name pattern language their fields use.

Each algorithm defines its own config class next to its adapter (``algorithms/<name>.py``);
:func:`config_class` finds it by ``peft_type``.  ``lora_alpha`` (and ``lora_dropout``,
``init_lora_weights``, ``init_ia3_weights``) are accepted as aliases so PEFT-style code runs unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .base import REGISTRY
from .common import AdapterOptions

CONFIG_NAME = "adapter_config.json"
_ALIASES = {
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "init_lora_weights": "init_weights",
    "init_ia3_weights": "init_weights",
}


def name_matches(name: str, targets: list[str] | str) -> bool:
    """Whether module ``name`` is named by ``targets`` (list: exact or dotted suffix; str: full regex)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def exact_pattern(names: list[str]) -> str:
    """A regex matching exactly these module names (a string ``target_modules`` is matched whole)."""
    return "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """The value of the first pattern that matches ``module_name`` (whole name or a dotted suffix)."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{key})", module_name):
            return value
    return default


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
    #: with no ``target_modules``, every layer of these kinds is adapted (empty: ``target_modules`` is needed)
    targets_by_kind: ClassVar[frozenset[str]] = frozenset()
    #: the peak AdamW learning rate this algorithm usually trains a pretrained Stable Diffusion model at
    #: (``beyondlora train``'s default for it)
    learning_rate: ClassVar[float] = 1e-4
    #: shared fields this algorithm has no form for, each with the reason (a set value is an error)
    refused_fields: ClassVar[dict[str, str]] = {}
    #: field values where LyCORIS' meaning differs from PEFT's default: the front ends that write LyCORIS /
    #: kohya files (:func:`build_config`) start from them
    lycoris_defaults: ClassVar[dict[str, Any]] = {}

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
            r=pattern_value(self.rank_pattern, module_name, self.r),
            alpha=float(pattern_value(self.alpha_pattern, module_name, self.alpha)),
            use_rslora=self.use_rslora,
            rank_dropout=self.rank_dropout,
            rank_dropout_scale=self.rank_dropout_scale,
            use_dora=self.use_dora,
            dora_on_output=self.dora_on_output,
        )


def read_config_json(directory: str | Path) -> dict[str, Any]:
    """The parsed ``adapter_config.json`` of a folder; a missing or malformed file raises naming it."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None


#: fields a user sets only to use them: for an algorithm whose config lacks one, a set value is an error
#: rather than silently dropped
EXPLICIT_FIELDS = {"dropout": 0.0, "use_dora": False, "constraint": 0.0, "rescaled": False}


def unsupported_fields(algorithm: str, fields: dict[str, Any]) -> list[str]:
    """The :data:`EXPLICIT_FIELDS` set in ``fields`` that ``algorithm``'s config does not have or refuses
    (:attr:`AdapterConfig.refused_fields`)."""
    cls = REGISTRY[algorithm].config_class
    known = {f.name for f in dataclasses.fields(cls)} - set(cls.refused_fields)
    return [k for k, unset in EXPLICIT_FIELDS.items() if fields.get(k, unset) != unset and k not in known]


def algo_names() -> dict[str, str]:
    """Every name ``--algo`` / kohya's ``algo=`` accepts (``locon``, ``lokr``, …) → its algorithm."""
    return {name: algorithm for algorithm, cls in REGISTRY.items() for name in cls.algo_names}


def build_config(algorithm: str, **fields: Any) -> AdapterConfig:
    """``algorithm``'s config from the fields every front end (the trainer, kohya's network args) may give:
    it takes those its config has and drops the rest (``r`` means nothing to (IA)³), except that a set
    :data:`EXPLICIT_FIELDS` entry it lacks is an error naming field and algorithm.  Fields not given take
    LyCORIS' meaning (:attr:`AdapterConfig.lycoris_defaults`): these front ends write LyCORIS files."""
    unsupported = unsupported_fields(algorithm, fields)
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)} does not apply to algorithm {algorithm}")
    cls = REGISTRY[algorithm].config_class
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**cls.lycoris_defaults, **{k: v for k, v in fields.items() if k in known}})


def config_classes() -> dict[str, type[AdapterConfig]]:
    """Every algorithm's config class by its ``peft_type``."""
    return {cls.config_class.peft_type: cls.config_class for cls in REGISTRY.values()}


def config_class(peft_type: str) -> type[AdapterConfig]:
    """The config class for a ``peft_type`` string such as ``"LOKR"``."""
    classes = config_classes()
    try:
        return classes[peft_type.upper()]
    except KeyError:
        raise ValueError(f"unknown peft_type {peft_type!r}; known: {', '.join(classes)}") from None
