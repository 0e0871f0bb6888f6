"""The training configuration: one dataclass whose every field is a TOML key and a ``--flag``.

Precedence: defaults < the TOML file < flags given on the command line.  :meth:`TrainConfig.validate`
checks everything that can be checked without loading a model, so a bad option fails in a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..algorithms import ALGORITHMS
from ..algorithms.config_base import algo_names, unsupported_fields
from ..integrations.kohya_args import PRESETS, load_preset

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


ALGOS = tuple(algo_names())
#: how many times the algorithm's usual learning rate the demo trains at: a tiny model and a 200-step run
DEMO_LEARNING_RATE_SCALE = 4.0


def default_learning_rate(algo: str, is_demo: bool) -> float:
    """``--algo``'s usual peak learning rate on a pretrained model (its config's ``learning_rate``), times
    :data:`DEMO_LEARNING_RATE_SCALE` on the demo."""
    rate = ALGORITHMS[algo_names()[algo]].config_class.learning_rate
    return rate * DEMO_LEARNING_RATE_SCALE if is_demo else rate


def _learning_rates() -> str:
    return ", ".join(f"{name} {default_learning_rate(name, False):g}" for name in ALGOS)


OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
SCHEDULES = ("constant", "cosine", "linear")
PRECISIONS = ("no", "fp16", "bf16")
PREDICTIONS = ("epsilon", "v_prediction")
SAVE_DTYPES = ("fp32", "fp16", "bf16")
BASE_PRECISIONS = ("fp32", "bf16", "fp16", "fp8")


class TrainConfigError(ValueError):
    """A bad or contradictory training option (raised before any heavy work)."""


@dataclass
class TrainConfig:
    """Every option of ``beyondlora train`` (the defaults run the built-in offline demo).

    Attributes (the help text of each flag is in its field's ``metadata``).
    """

    pretrained_model: str = field(
        default="demo",
        metadata={
            "help": "'demo', 'tiny-sd', 'tiny-sdxl', 'tiny-sd3', 'tiny-flux', a diffusers folder (SD 1.x/2.x/XL, "
            "SD3, Flux) or a single-file SD checkpoint (.safetensors)"
        },
    )
    base_config: str | None = field(
        default=None,
        metadata={
            "help": "for a single-file --pretrained-model: a diffusers folder holding the pipeline's configs and "
            "tokenizer(s) (default: diffusers' own choice, from the local Hugging Face cache)"
        },
    )
    train_data_dir: str | None = field(
        default=None,
        metadata={
            "help": "images with same-name .txt captions (kohya layout, N_name repeat folders) or an "
            "imagefolder with metadata.jsonl; default: the demo concept"
        },
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "where everything is written (default ./output/<timestamp>)"}
    )
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in --output-dir"})
    # network
    algo: str = field(default="lokr", metadata={"help": "/".join(ALGOS)})
    rank: int = field(default=8, metadata={"help": "rank (LoKr: of the decomposed factor)"})
    alpha: float | None = field(default=None, metadata={"help": "alpha (default: rank)"})
    conv_rank: int | None = field(default=None, metadata={"help": "rank of 3×3 convs (default: rank)"})
    conv_alpha: float | None = field(default=None, metadata={"help": "alpha of 3×3 convs (default: conv rank)"})
    factor: int = field(default=-1, metadata={"help": "LoKr factor (-1: balanced)"})
    preset: str = field(
        default="full", metadata={"help": "layers to adapt: " + "/".join(PRESETS) + " (kohya's), or a preset TOML file"}
    )
    use_dora: bool = field(default=False, metadata={"help": "DoRA weight decomposition"})
    constraint: float = field(default=0.0, metadata={"help": "OFT/BOFT: cap ‖Q‖ at constraint × outputs (0: none)"})
    rescaled: bool = field(default=False, metadata={"help": "OFT/BOFT: a trainable magnitude per output channel"})
    train_text_encoder: bool = field(default=False, metadata={"help": "also adapt the text encoder(s)"})
    # data
    resolution: int | None = field(default=None, metadata={"help": "training side in pixels (default: the model's)"})
    batch_size: int | None = field(
        default=None,
        metadata={
            "help": "images per step per process (default: the model's: 8 on the demo and tiny models, "
            "2 on SD 1.x/2.x, 1 on SDXL)"
        },
    )
    enable_bucket: bool = field(default=True, metadata={"help": "aspect-ratio bucketing"})
    random_flip: bool = field(default=False, metadata={"help": "mirror images at random"})
    random_crop: bool = field(
        default=False, metadata={"help": "random instead of centre crops (not with latent caching)"}
    )
    shuffle_caption: bool = field(default=False, metadata={"help": "shuffle comma-separated caption tags"})
    keep_tokens: int = field(default=0, metadata={"help": "leading tags kept in place when shuffling"})
    caption_dropout: float = field(default=0.0, metadata={"help": "probability of an empty caption"})
    cache_latents: bool = field(default=True, metadata={"help": "encode every image once, in memory"})
    cache_latents_to_disk: bool = field(default=False, metadata={"help": "also keep the latent cache on disk"})
    # optimisation
    max_steps: int = field(default=200, metadata={"help": "optimizer steps"})
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": f"peak learning rate (default: by algorithm: {_learning_rates()}; "
            f"{DEMO_LEARNING_RATE_SCALE:g}× that on the demo)"
        },
    )
    optimizer: str = field(default="adamw", metadata={"help": "/".join(OPTIMIZERS)})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lr_scheduler: str = field(default="constant", metadata={"help": "/".join(SCHEDULES)})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps"})
    gradient_accumulation: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0: off)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations (less memory)"})
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "/".join(PRECISIONS) + " (fp16 on GPU only; default: accelerate's setting, e.g. "
            "accelerate launch --mixed_precision, else no)"
        },
    )
    base_precision: str = field(
        default="fp32",
        metadata={
            "help": "/".join(BASE_PRECISIONS) + ": storage of the frozen denoiser and text encoders (bf16 halves "
            "a Flux-sized model's memory, fp8 quarters it computing in bf16; needs --mixed-precision bf16 or "
            "fp16 to match); adapters stay fp32"
        },
    )
    noise_offset: float = field(default=0.0, metadata={"help": "noise offset"})
    min_snr_gamma: float | None = field(default=None, metadata={"help": "min-SNR-γ loss weighting"})
    prediction_type: str | None = field(default=None, metadata={"help": "epsilon/v_prediction (default: the model's)"})
    seed: int = field(default=0, metadata={"help": "seed of everything random"})
    # outputs
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (0: only at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "how many checkpoints to keep"})
    sample_every: int = field(default=0, metadata={"help": "sample grid every N steps (0: never)"})
    sample_prompts: list[str] | None = field(
        default=None, metadata={"help": "prompts of samples and the before/after grid"}
    )
    sample_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3], metadata={"help": "seeds of the sample grid rows"}
    )
    sample_steps: int = field(default=20, metadata={"help": "DDIM steps per sample"})
    guidance_scale: float | None = field(
        default=None, metadata={"help": "classifier-free guidance of samples (default: 1.5 for the demo, else 7.5)"}
    )
    eval_every: int = field(
        default=0,
        metadata={
            "help": "run beyondlora evaluate's metrics on the adapter every N steps into metrics.jsonl (0: never)"
        },
    )
    eval_trigger: str | None = field(
        default=None, metadata={"help": "the phrase naming the concept in the captions (needed with --train-data-dir)"}
    )
    eval_images: int = field(default=8, metadata={"help": "images per prompt type of each evaluation"})
    eval_clip: str | None = field(default=None, metadata={"help": "a local CLIP folder for the evaluation's metrics"})
    eval_dino: str | None = field(default=None, metadata={"help": "a local DINOv2 folder for the evaluation's metrics"})
    save_precision: str = field(default="fp32", metadata={"help": "/".join(SAVE_DTYPES) + " of the adapter file"})
    save_as_difference: bool = field(
        default=False,
        metadata={
            "help": "write modules the UIs would not apply exactly ((IA)³, output-axis DoRA, OFT's constraint) "
            "as their exact weight change, which ComfyUI and A1111 apply (a larger file)"
        },
    )
    threads: int | None = field(default=None, metadata={"help": "torch CPU threads"})

    #: the options a TOML file or flag named (set by :meth:`from_sources`), to tell a default from a choice;
    #: not an option itself (``init=False`` fields are neither flags nor written out)
    named: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    # --- loading -----------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path) -> dict[str, Any]:
        """The options in a TOML file (a flat table, or under ``[train]``); unknown keys are an error."""
        path = Path(path)
        if not path.is_file():
            raise TrainConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as error:
            raise TrainConfigError(f"{path} is not valid TOML: {error}") from None
        data = data.get("train", data)
        data = {key.replace("-", "_"): value for key, value in data.items()}
        unknown = sorted(set(data) - {f.name for f in options()})
        if unknown:
            raise TrainConfigError(f"{path}: unknown option(s): {', '.join(unknown)}")
        return data

    @classmethod
    def from_sources(cls, toml_path: str | None, flags: dict[str, Any]) -> TrainConfig:
        values = cls.from_toml(toml_path) if toml_path else {}
        values.update({k: v for k, v in flags.items() if v is not None})
        try:
            config = cls(**values)
        except TypeError as error:
            raise TrainConfigError(str(error)) from None
        config.check_types()
        config.named = frozenset(values)
        return config

    def was_set(self, option: str) -> bool:
        """Whether the run chose ``option``: named in its TOML or flags, or away from its default."""
        if option in self.named:
            return True
        default = next(f for f in options() if f.name == option).default
        return getattr(self, option) != default

    def check_types(self) -> None:
        for f in options():
            value, kinds = getattr(self, f.name), _base_types(f.type)
            if value is None and type(None) in kinds:
                continue
            if float in kinds and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
                continue
            if not any(_is_instance(value, kind) for kind in kinds if kind is not type(None)):
                raise TrainConfigError(f"option {f.name} must be {f.type}, got {value!r}")

    # --- checks ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Every check that needs no model: bad values and options that contradict each other (fp16 on a
        CPU is refused where the device is known, by :class:`.distributed.Engine`)."""
        choices = {
            "algo": ALGOS,
            "optimizer": OPTIMIZERS,
            "lr_scheduler": SCHEDULES,
            "mixed_precision": PRECISIONS,
            "save_precision": SAVE_DTYPES,
            "base_precision": BASE_PRECISIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in (*allowed, None):  # None: a default decided later
                raise TrainConfigError(
                    f"--{_flag(name)} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        if self.prediction_type not in (None, *PREDICTIONS):
            raise TrainConfigError(f"--prediction-type must be epsilon or v_prediction, got {self.prediction_type!r}")
        positive = (
            "rank",
            "batch_size",
            "max_steps",
            "gradient_accumulation",
            "sample_steps",
            "keep_checkpoints",
            "eval_images",
        )
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise TrainConfigError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in (
            "save_every",
            "sample_every",
            "eval_every",
            "warmup_steps",
            "keep_tokens",
            "noise_offset",
            "weight_decay",
            "max_grad_norm",
        ):
            if getattr(self, name) < 0:
                raise TrainConfigError(f"--{_flag(name)} must not be negative, got {getattr(self, name)}")
        if self.conv_rank is not None and self.conv_rank < 1:
            raise TrainConfigError(f"--conv-rank must be at least 1, got {self.conv_rank}")
        if self.learning_rate is not None and not self.learning_rate > 0:
            raise TrainConfigError(f"--learning-rate must be positive, got {self.learning_rate}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise TrainConfigError(f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise TrainConfigError(f"--min-snr-gamma must be positive, got {self.min_snr_gamma}")
        if self.warmup_steps > self.max_steps:
            raise TrainConfigError(f"--warmup-steps ({self.warmup_steps}) exceeds --max-steps ({self.max_steps})")
        if self.resume and self.output_dir is None:
            raise TrainConfigError("--resume needs the --output-dir of the run to continue")
        if self.random_crop and self.cache_latents:
            raise TrainConfigError(
                "--random-crop contradicts --cache-latents (cached latents have one crop); pass --no-cache-latents"
            )
        if self.cache_latents_to_disk and not self.cache_latents:
            raise TrainConfigError("--cache-latents-to-disk contradicts --no-cache-latents")
        if self.algo in ALGOS and unsupported_fields(algo_names()[self.algo], {"use_dora": self.use_dora}):
            raise TrainConfigError(f"--use-dora does not apply to --algo {self.algo}")
        try:
            preset = load_preset(self.preset)
        except ValueError as error:
            raise TrainConfigError(f"--preset: {error}") from None
        if (self.conv_rank is not None or self.conv_alpha is not None) and not preset.get("enable_conv", True):
            raise TrainConfigError(
                f"--conv-rank/--conv-alpha need --preset full (or another preset that adapts 3×3 convs; "
                f"{self.preset} adapts none)"
            )
        modules = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt"}
        if self.optimizer in modules:
            import importlib.util

            if importlib.util.find_spec(modules[self.optimizer]) is None:
                raise TrainConfigError(f"--optimizer {self.optimizer} needs the {modules[self.optimizer]} package")
        if self.eval_every and self.train_data_dir is not None and not self.eval_trigger:
            raise TrainConfigError(
                "--eval-every on your own data needs --eval-trigger: the phrase your captions name the concept with"
            )
        if self.sample_prompts is not None and not self.sample_prompts:
            raise TrainConfigError("--sample-prompts is empty")

    def fill_model_defaults(self, is_demo: bool, batch_size: int, resolution: int) -> None:
        """Settle the defaults that depend on the base model (and the algorithm): the learning rate
        (:func:`default_learning_rate`), the batch size and the resolution, where the run left them open."""
        if self.learning_rate is None:
            self.learning_rate = default_learning_rate(self.algo, is_demo)
        if self.batch_size is None:
            self.batch_size = batch_size
        if self.resolution is None:
            self.resolution = resolution

    # --- writing -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in options()}

    def to_toml(self) -> str:
        """The configuration as TOML (options that are unset are left out, as TOML has no null)."""
        lines = ["# the effective configuration of this run: beyondlora train config.toml reruns it"]
        for key, value in self.to_dict().items():
            if value is not None:
                lines.append(f"{key} = {json.dumps(value)}")
        return "\n".join(lines) + "\n"


def options() -> list[dataclasses.Field]:
    """The fields of :class:`TrainConfig` that are options (a flag, a TOML key, a line of ``config.toml``)."""
    return [f for f in dataclasses.fields(TrainConfig) if f.init]


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _base_types(annotation: Any) -> tuple[Any, ...]:
    hint = eval(annotation, {"list": list}) if isinstance(annotation, str) else annotation  # noqa: S307
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _is_instance(value: Any, kind: Any) -> bool:
    origin = typing.get_origin(kind)
    if origin is list:
        (item,) = typing.get_args(kind)
        return isinstance(value, list) and all(_is_instance(v, item) for v in value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per field (``--x/--no-x`` for booleans), its help ending in the field's default; the
    parsed defaults are None so TOML values stay."""
    parser.add_argument("config", nargs="?", help="a TOML file of options (flags override it)")
    for f in options():
        kinds = [k for k in _base_types(f.type) if k is not type(None)]
        kind = kinds[0]
        help_text = f.metadata.get("help", "")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is not None and default != [] and "default" not in help_text:
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            help_text = f"{help_text} (default: {shown})".strip()
        flag = f"--{_flag(f.name)}"
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typing.get_origin(kind) is list:
            (item,) = typing.get_args(kind)
            parser.add_argument(flag, dest=f.name, type=item, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=kind, default=None, help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    flags = {f.name: getattr(args, f.name, None) for f in options()}
    return TrainConfig.from_sources(args.config, flags)
