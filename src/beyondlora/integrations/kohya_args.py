"""kohya sd-scripts ``network_args``: typed parsing, presets, and which layers of a model get which adapter.

sd-scripts passes ``--network_args key=value …`` as strings (and a few keywords of its own, possibly
``None``).  Every value is parsed to its type here: booleans accept ``true/false``, ``1/0``, ``yes/no``,
``on/off``; an unknown argument, or a value of the wrong type, is an error naming it.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from ..algorithms import ALGORITHMS
from ..algorithms.config_base import AdapterConfig, algo_names, build_config
from ..algorithms.full import Norm
from ..host.targeting import iter_candidate_modules
from ..ops.geometry import layer_kind

_TRUE = {"true", "1", "yes", "y", "on", "t"}
_FALSE = {"false", "0", "no", "n", "off", "f"}
#: other names sd-scripts users pass for our arguments (LyCORIS spellings)
ALIASES = {
    "use_cp": "use_tucker",
    "use_conv_cp": "use_tucker",
    "rs_lora": "use_rslora",
    "weight_decompose": "dora_wd",
    "linear_dim": "dim",
    "linear_alpha": "alpha",
    "train_on_input": "on_input",
}

UNET_BLOCKS = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
#: the UNet's own layers outside those blocks (diffusers names, then the SGM names of sd-scripts' SDXL UNet)
UNET_NAMES = ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]
UNET_NAMES += ["input_blocks.0.0", "out.2", "time_embed.0", "time_embed.2"]
TEXT_BLOCKS = ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"]
#: the transformer blocks of SD3 (joint) and Flux (double, single) in diffusers: attention, MLP and modulation
DIT_BLOCKS = ["JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock"]
#: a DiT's own layers outside its blocks that the full presets add: the image and text embedders, the output
DIT_NAMES = ["x_embedder", "context_embedder", "proj_out"]
_LINEAR_ONLY = dict(enable_conv=False)
_TRANSFORMERS = ["Transformer2DModel", *DIT_BLOCKS]
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(
        unet_target_module=UNET_BLOCKS + DIT_BLOCKS,
        unet_target_name=UNET_NAMES + DIT_NAMES,
        text_encoder_target_module=TEXT_BLOCKS,
    ),
    "full-lin": dict(
        _LINEAR_ONLY, unet_target_module=[*_TRANSFORMERS, "ResnetBlock2D"], text_encoder_target_module=TEXT_BLOCKS
    ),
    "attn-mlp": dict(_LINEAR_ONLY, unet_target_module=_TRANSFORMERS, text_encoder_target_module=TEXT_BLOCKS),
    "attn-only": dict(
        _LINEAR_ONLY,
        unet_target_module=["Attention", "CrossAttention", "SelfAttention", "FluxAttention"],
        text_encoder_target_module=["CLIPAttention", "CLIPSdpaAttention"],
    ),
    "unet-only": dict(unet_target_module=UNET_BLOCKS + DIT_BLOCKS, unet_target_name=UNET_NAMES + DIT_NAMES),
    "unet-transformer-only": dict(_LINEAR_ONLY, unet_target_module=_TRANSFORMERS),
    "unet-convblock-only": dict(
        unet_target_module=["ResnetBlock2D", "Downsample2D", "Upsample2D"],
        unet_target_name=["conv_in", "conv_out", "input_blocks.0.0", "out.2"],
    ),
    "ia3": dict(
        _LINEAR_ONLY,
        unet_target_name=["to_k", "to_v", "ff.net.2"],
        text_encoder_target_name=["k_proj", "v_proj", "mlp.fc2"],
        name_algo_map={"ff.net.2": {"on_input": True}, "mlp.fc2": {"on_input": True}},
    ),
}
PRESETS["attn"] = PRESETS["attn-only"]  # beyondlora train's earlier name for it
PRESET_KEYS = {
    "enable_conv",
    "unet_target_module",
    "unet_target_name",
    "text_encoder_target_module",
    "text_encoder_target_name",
    "exclude_name",
    "module_algo_map",
    "name_algo_map",
    "use_fnmatch",
}


def parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"network arg {name}={value!r} is not a boolean (use true/false, 1/0, yes/no, on/off)")


@dataclass
class NetworkArgs:
    """Every ``network_args`` value, typed (``None``: not given, the default applies)."""

    algo: str = "lora"
    dim: int = 4
    alpha: float = 1.0
    conv_dim: int | None = None
    conv_alpha: float | None = None
    dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    rank_dropout_scale: bool = False
    factor: int = -1
    decompose_both: bool = False
    unbalanced_factorization: bool = False
    use_tucker: bool = False
    use_scalar: bool = False
    use_rslora: bool = False
    train_norm: bool = False
    block_size: int = 4
    dora_wd: bool = False
    wd_on_output: bool = True
    on_input: bool = False
    constraint: float = 0.0
    rescaled: bool = False
    preset: str = "full"
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    given: set[str] = field(default_factory=set, repr=False)

    @classmethod
    def parse(cls, raw: dict[str, Any], base: NetworkArgs | None = None) -> NetworkArgs:
        """Typed arguments from ``raw`` (strings or values; ``None`` means not given) on top of ``base``."""
        args = dataclasses.replace(base, given=set(base.given)) if base else cls()
        types = {f.name: f.type for f in fields(cls) if f.name != "given"}
        for key, value in raw.items():
            name = ALIASES.get(key, key)
            if name not in types:
                known = ", ".join(sorted(types))
                raise ValueError(f"unknown network arg {key!r}; known: {known}")
            if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
                continue
            setattr(args, name, _typed(key, types[name], value))
            args.given.add(name)
        names = algo_names()
        if args.algo.lower() not in names:
            raise ValueError(f"network arg algo={args.algo!r} is unknown; use one of {', '.join(names)}")
        args.algo = names[args.algo.lower()]
        for name in ("dim", "conv_dim", "block_size"):
            value = getattr(args, name)
            if value is not None and value < 0:
                raise ValueError(f"network arg {name}={value} must not be negative")
        if args.use_scalar and not ALGORITHMS[args.algo].supports_scalar:
            scaled = ", ".join(name for name, cls in ALGORITHMS.items() if cls.supports_scalar)
            raise ValueError(f"network arg use_scalar applies to {scaled}, not {args.algo}")
        return args

    @property
    def linear(self) -> tuple[int, float]:
        return self.dim, self.alpha

    @property
    def conv(self) -> tuple[int, float]:
        dim = self.dim if self.conv_dim is None else self.conv_dim
        return dim, self.alpha if self.conv_alpha is None else self.conv_alpha


def _typed(name: str, annotation: Any, value: Any) -> Any:
    text = str(annotation)
    if "bool" in text:
        return parse_bool(name, value)
    try:
        if "int" in text:
            number = float(value)
            if number != int(number):
                raise ValueError
            return int(number)
        if "float" in text:
            return float(value)
    except (TypeError, ValueError):
        kind = "an integer" if "int" in text else "a number"
        raise ValueError(f"network arg {name}={value!r} is not {kind}") from None
    return str(value)


def load_preset(preset: str) -> dict[str, Any]:
    """A named preset, or a TOML file with LyCORIS' preset keys; unknown keys are an error naming them."""
    if preset in PRESETS:
        return dict(PRESETS[preset])
    path = Path(preset)
    if not path.is_file():
        raise ValueError(f"network arg preset={preset!r} is neither a preset ({', '.join(PRESETS)}) nor a file")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"preset file {path} is not valid TOML: {error}") from None
    unknown = sorted(set(data) - PRESET_KEYS)
    if unknown:
        raise ValueError(f"preset file {path}: unknown key(s) {unknown}; known: {sorted(PRESET_KEYS)}")
    for key in ("module_algo_map", "name_algo_map"):
        for target, override in data.get(key, {}).items():
            NetworkArgs.parse(override)  # validates every override now, naming the bad argument
            if not isinstance(override, dict):
                raise ValueError(f"preset file {path}: {key}.{target} must be a table")
    return data


def _name_matches(pattern: str, name: str, use_fnmatch: bool) -> bool:
    if use_fnmatch:
        import fnmatch

        return fnmatch.fnmatch(name, pattern)
    return name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) is not None


@dataclass
class Selection:
    """One module to adapt and the arguments that apply to it."""

    name: str
    args: NetworkArgs


def select_modules(model: nn.Module, text: bool, args: NetworkArgs, preset: dict[str, Any]) -> list[Selection]:
    """The layers of ``model`` (a UNet, or a text encoder when ``text``) that get an adapter, LyCORIS' way:
    every adaptable layer inside a module of a targeted class, and every module named by the preset."""
    part = "text_encoder" if text else "unet"
    classes = preset.get(f"{part}_target_module", [])
    names = preset.get(f"{part}_target_name", [])
    excluded = preset.get("exclude_name", [])
    fn = bool(preset.get("use_fnmatch", False))
    enable_conv = preset.get("enable_conv", True)
    by_class, by_name = preset.get("module_algo_map", {}), preset.get("name_algo_map", {})
    chosen: dict[str, NetworkArgs] = {}
    classes_of = {name: type(module).__name__ for name, module in model.named_modules()}
    for scope_name, scope in iter_candidate_modules(model):
        if type(scope).__name__ in classes:
            inner = [(f"{scope_name}.{n}" if n else scope_name, m) for n, m in scope.named_modules()]
        elif any(_name_matches(p, scope_name, fn) for p in names):
            inner = [(scope_name, scope)]
        else:
            continue
        for name, module in inner:
            if name in chosen or any(_name_matches(p, name, fn) for p in excluded):
                continue
            override = next((v for p, v in by_name.items() if _name_matches(p, name, fn)), None)
            override = override or _class_override(name, classes_of, by_class)
            module_args = NetworkArgs.parse(override, args) if override else args
            if _adaptable(module, module_args, enable_conv):
                chosen[name] = module_args
    return [Selection(name, a) for name, a in chosen.items()]


def _class_override(name: str, classes_of: dict[str, str], by_class: dict[str, Any]) -> dict[str, Any]:
    """The ``module_algo_map`` entry of the innermost module around ``name`` (itself included) that has one."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        override = by_class.get(classes_of.get(".".join(parts[:cut]), ""))
        if override:
            return override
    return {}


def _adaptable(module: nn.Module, args: NetworkArgs, enable_conv: bool) -> bool:
    kind = layer_kind(module)
    if kind in ("layer_norm", "group_norm"):
        return args.train_norm
    if kind in ("linear", "hf_conv1d") or kind == "conv" and all(k == 1 for k in module.kernel_size):
        return args.dim > 0  # linear layers and pointwise convolutions use the linear dim
    if kind == "conv":
        return enable_conv and args.conv[0] > 0
    return False


def adapter_config(args: NetworkArgs, names: list[str], conv: bool, norm: bool) -> AdapterConfig:
    """The adapter config for a group of modules sharing ``args`` (``conv``: k×k convolutions; ``norm``:
    LayerNorm / GroupNorm layers, which ``train_norm`` tunes with Norm)."""
    targets = sorted(names)
    if norm:
        return build_config(Norm.algorithm, target_modules=targets, module_dropout=args.module_dropout)
    r, alpha = args.conv if conv else args.linear
    try:
        return build_config(
            args.algo,
            target_modules=targets,
            module_dropout=args.module_dropout,
            r=r,
            alpha=alpha,
            use_rslora=args.use_rslora,
            rank_dropout=args.rank_dropout,
            rank_dropout_scale=args.rank_dropout_scale,
            use_dora=args.dora_wd,
            dora_on_output=args.wd_on_output,
            init_weights=False if args.use_scalar else True,
            use_effective_conv2d=args.use_tucker,
            dropout=args.dropout,
            block_size=args.block_size,
            decompose_both=args.decompose_both,
            decompose_factor=args.factor,
            unbalanced_factorization=args.unbalanced_factorization,
            feedforward_modules=targets if args.on_input else None,
            constraint=args.constraint,
            rescaled=args.rescaled,
        )
    except ValueError as error:
        raise ValueError(f"network arg {error}") from None
