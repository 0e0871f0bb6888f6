"""Canonical Stable Diffusion module names: diffusers module paths ⇄ kohya / SGM single-file keys ⇄ PEFT keys.

Single files name a module ``<prefix>_<path with dots as underscores>``, where the path is the one kohya
sd-scripts trains on:

- UNet (``lora_unet``): SD 1.x/2.x use diffusers' module paths; SDXL uses the original (SGM / LDM)
  checkpoint's ``input_blocks.… / middle_block.… / output_blocks.…`` paths.
- CLIP text encoders (``lora_te``; SDXL ``lora_te1`` / ``lora_te2``): ``text_model.encoder.layers.{i}.…``
  whatever the installed transformers' module tree (transformers 5 dropped the ``text_model`` level from
  ``CLIPTextModel``).

PEFT / diffusers keys name a module ``<part>.<diffusers module path>`` (``unet.down_blocks.0…``).

SD3 / Flux transformers (``lora_unet`` + the original checkpoints' paths, some of them fused layers) and
their text encoders (``lora_te1`` / ``lora_te2`` / ``lora_te3``) are named by the tables of
:mod:`.dit_names`.

Everything here is driven by the tables below and by the model's own block structure; nothing is
guessed from strings.  :class:`PartNames` holds, for one model part, the name written for each module and
every name accepted when reading (diffusers and SGM paths, with or without ``text_model``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import nn

from ..host.targeting import iter_candidate_modules
from .dit_names import Segment, dit_table, is_dit, text_encoder_prefixes

#: pipeline part → (prefix written, prefixes read); SDXL's first text encoder writes ``lora_te1``
PART_PREFIXES: dict[str, tuple[str, tuple[str, ...]]] = {
    "unet": ("lora_unet", ("lora_unet",)),
    "text_encoder": ("lora_te", ("lora_te", "lora_te1")),
    "text_encoder_2": ("lora_te2", ("lora_te2",)),
}
#: an SD3 / Flux transformer: kohya's checkpoint paths, or diffusers' paths (OneTrainer, SimpleTuner)
TRANSFORMER_PREFIXES = ("lora_unet", ("lora_unet", "lora_transformer", "lycoris"))
#: how a transformer's modules are written: ``kohya`` (checkpoint paths, fused layers joined, what kohya
#: sd-scripts and ComfyUI use) or ``lycoris`` (``lycoris_`` + diffusers paths, as SimpleTuner writes them)
NAME_STYLES = ("kohya", "lycoris")
SDXL_TEXT_ENCODER_PREFIX = "lora_te1"

#: diffusers UNet modules outside the down/mid/up blocks → their SGM paths
SGM_TOP_LEVEL: dict[str, str] = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
#: inside a diffusers ``ResnetBlock2D`` → inside an SGM ``ResBlock``
SGM_RESNET: dict[str, str] = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
SGM_DOWNSAMPLER: dict[str, str] = {"conv": "op"}
SGM_UPSAMPLER: dict[str, str] = {"conv": "conv"}
#: children of a CLIP text model that live under ``text_model`` in checkpoints and kohya keys
CLIP_TEXT_MODEL_CHILDREN = ("embeddings", "encoder", "final_layer_norm")

#: a block's SGM path and how its inner names translate (``None``: unchanged, e.g. attention blocks)
BlockEntry = tuple[str, Mapping[str, str] | None]


def is_diffusers_unet(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("down_blocks", "mid_block", "up_blocks", "conv_in"))


def is_sgm_unet(model: nn.Module) -> bool:
    """An SGM-layout UNet (sd-scripts' SDXL UNet): its own module paths are already the canonical ones."""
    return all(hasattr(model, a) for a in ("input_blocks", "middle_block", "output_blocks"))


def is_sdxl_unet(model: nn.Module) -> bool:
    """A diffusers UNet with SDXL's added time/text conditioning (kohya writes SGM paths for it)."""
    config = getattr(model, "config", None)
    return is_diffusers_unet(model) and getattr(config, "addition_embed_type", None) == "text_time"


def is_clip_text_model(model: nn.Module) -> bool:
    return type(model).__name__.startswith("CLIPText")


def sgm_block_table(unet: nn.Module) -> dict[str, BlockEntry]:
    """diffusers block paths of ``unet`` → (SGM path, inner-name table), from the UNet's own blocks.

    SGM numbers ``input_blocks`` from 1 (0 is ``conv_in``): each resnet (with its attention beside it at
    ``.1``) takes one index, then the downsampler one more.  ``output_blocks`` count from 0 the same way,
    the upsampler sitting after the last resnet (and attention) of its level.  The middle block alternates
    resnet, attention, resnet.
    """
    table: dict[str, BlockEntry] = {}
    index = 1
    for b, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None) or []
        for j in range(len(block.resnets)):
            table[f"down_blocks.{b}.resnets.{j}"] = (f"input_blocks.{index}.0", SGM_RESNET)
            if j < len(attentions):
                table[f"down_blocks.{b}.attentions.{j}"] = (f"input_blocks.{index}.1", None)
            index += 1
        for k in range(len(getattr(block, "downsamplers", None) or [])):
            table[f"down_blocks.{b}.downsamplers.{k}"] = (f"input_blocks.{index}.0", SGM_DOWNSAMPLER)
            index += 1
    mid = unet.mid_block
    if mid is not None:
        for j in range(len(mid.resnets)):
            table[f"mid_block.resnets.{j}"] = (f"middle_block.{2 * j}", SGM_RESNET)
        for j in range(len(getattr(mid, "attentions", None) or [])):
            table[f"mid_block.attentions.{j}"] = (f"middle_block.{2 * j + 1}", None)
    index = 0
    for b, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or []
        count = len(block.resnets)
        for j in range(count):
            table[f"up_blocks.{b}.resnets.{j}"] = (f"output_blocks.{index}.0", SGM_RESNET)
            slot = 1
            if j < len(attentions):
                table[f"up_blocks.{b}.attentions.{j}"] = (f"output_blocks.{index}.1", None)
                slot = 2
            if j == count - 1 and getattr(block, "upsamplers", None):
                table[f"up_blocks.{b}.upsamplers.0"] = (f"output_blocks.{index}.{slot}", SGM_UPSAMPLER)
            index += 1
    return table


def diffusers_to_sgm(name: str, blocks: Mapping[str, BlockEntry]) -> str | None:
    """The SGM path of diffusers UNet module ``name``; ``None`` when the checkpoint has no such module."""
    if name in SGM_TOP_LEVEL:
        return SGM_TOP_LEVEL[name]
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        entry = blocks.get(".".join(parts[:cut]))
        if entry is None:
            continue
        target, inner = entry
        rest = ".".join(parts[cut:])
        if not rest:
            return target
        if inner is None:
            return f"{target}.{rest}"
        return f"{target}.{inner[rest]}" if rest in inner else None
    return None


def clip_canonical(model: nn.Module, name: str) -> str:
    """A CLIP text-model module path with the ``text_model`` level checkpoints (and UIs) have."""
    if hasattr(model, "text_model") or name.split(".")[0] not in CLIP_TEXT_MODEL_CHILDREN:
        return name
    return f"text_model.{name}"


def flat(path: str) -> str:
    return path.replace(".", "_")


@dataclass
class PartNames:
    """How the modules of one model part are named in files.

    Attributes:
        role: the pipeline attribute (``unet``, ``text_encoder``, ``text_encoder_2``) or ``""`` for a
            plain module.
        prefix: the single-file prefix written (``lora_unet``…).
        read_prefixes: the prefixes accepted when reading.
        written: module name → the dotted path written after the prefix.
        accepted: dotted path (written or alternative form) → module name.
        fused: dotted path → the segments of modules it stacks (SD3 / Flux checkpoints' fused layers), read
            always, written when ``write_fused``.
    """

    role: str
    prefix: str
    read_prefixes: tuple[str, ...]
    written: dict[str, str]
    accepted: dict[str, str]
    fused: dict[str, tuple[Segment, ...]] = field(default_factory=dict)
    write_fused: bool = False
    _by_flat: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        by_flat: dict[str, set[str]] = defaultdict(set)
        for path, module in self.accepted.items():
            by_flat[flat(path)].add(module)
        self._by_flat = {k: sorted(v) for k, v in by_flat.items()}
        self._fused_by_flat = {flat(path): path for path in self.fused}

    def key(self, module_name: str) -> str:
        """The single-file module key of ``module_name`` (``lora_unet_input_blocks_4_1_proj_in``)."""
        if module_name not in self.written:
            raise KeyError(f"module {module_name!r} of {self.role or 'the model'} has no name in {self.prefix} files")
        return f"{self.prefix}_{flat(self.written[module_name])}"

    def owns(self, key: str) -> bool:
        return any(key.startswith(p + "_") for p in self.read_prefixes)

    def module_for_key(self, key: str) -> str | None:
        """The module a single-file module key names, or ``None``; an ambiguous key raises."""
        for prefix in self.read_prefixes:
            if key.startswith(prefix + "_"):
                modules = self._by_flat.get(key[len(prefix) + 1 :], [])
                if len(modules) > 1:
                    raise ValueError(f"key {key!r} names several modules of {self.role}: {modules}")
                if modules:
                    return modules[0]
        return None

    def fused_for_key(self, key: str) -> str | None:
        """The fused path (a key of :attr:`fused`) a single-file module key names, or ``None``."""
        for prefix in self.read_prefixes:
            if key.startswith(prefix + "_") and key[len(prefix) + 1 :] in self._fused_by_flat:
                return self._fused_by_flat[key[len(prefix) + 1 :]]
        return None

    def fused_key(self, path: str) -> str:
        """The single-file module key of fused path ``path``."""
        return f"{self.prefix}_{flat(path)}"

    def peft_key(self, module_name: str) -> str:
        """diffusers' PEFT-style module key: ``<part>.<module path>``."""
        return f"{self.role}.{module_name}" if self.role else module_name

    def module_for_path(self, path: str) -> str | None:
        """The module a dotted path names (diffusers or canonical form), or ``None``."""
        return self.accepted.get(path)


def part_names(model: nn.Module, role: str = "", prefix: str | None = None, style: str = "kohya") -> PartNames:
    """The naming of ``model`` as pipeline part ``role`` (``""``: a plain module, identity paths).

    ``prefix`` overrides the prefix written (and then is the one read); ``style`` (:data:`NAME_STYLES`) picks
    how an SD3 / Flux transformer is written.
    """
    if style not in NAME_STYLES:
        raise ValueError(f"names must be one of {NAME_STYLES}, got {style!r}")
    written_prefix, read_prefixes = PART_PREFIXES.get(role, ("lycoris", ("lycoris",)))
    if is_dit(model):
        written_prefix, read_prefixes = TRANSFORMER_PREFIXES
    if prefix is not None:
        written_prefix, read_prefixes = prefix, (prefix,)
    names = [name for name, _ in iter_candidate_modules(model)]
    written: dict[str, str] = {}
    accepted: dict[str, str] = {}
    if is_dit(model):
        return _dit_names(model, role, names, (written_prefix, read_prefixes), style)
    if is_diffusers_unet(model):
        blocks = sgm_block_table(model)
        sgm = {name: diffusers_to_sgm(name, blocks) for name in names}
        sdxl = is_sdxl_unet(model)
        for name in names:
            if sdxl and sgm[name] is not None:
                written[name] = sgm[name]
            elif not sdxl:
                written[name] = name
            accepted[name] = name
            if sgm[name] is not None:
                accepted[sgm[name]] = name
    elif is_clip_text_model(model):
        for name in names:
            written[name] = clip_canonical(model, name)
            accepted[written[name]] = name
            accepted[name] = name
    else:  # plain modules and SGM UNets: the module paths are the canonical ones
        for name in names:
            written[name] = accepted[name] = name
    return PartNames(role, written_prefix, read_prefixes, written, accepted)


def _dit_names(
    model: nn.Module, role: str, names: list[str], prefixes: tuple[str, tuple[str, ...]], style: str
) -> PartNames:
    """An SD3 / Flux transformer: diffusers paths are always accepted; one-to-one checkpoint paths are
    accepted and (style ``kohya``) written, fused ones go to :attr:`PartNames.fused`."""
    table = dit_table(model, set(names))
    accepted = {name: name for name in names}
    fused: dict[str, tuple[Segment, ...]] = {}
    by_module: dict[str, str] = {}
    for path, segments in table.items():
        if len(segments) == 1 and segments[0].chunk is None:
            accepted[path] = segments[0].module
            by_module[segments[0].module] = path
        else:
            fused[path] = segments
    if style == "lycoris":
        return PartNames(role, "lycoris", prefixes[1], dict(accepted), accepted, fused)
    return PartNames(role, prefixes[0], prefixes[1], by_module, accepted, fused, write_fused=True)


def pipeline_part_names(parts: Mapping[str, nn.Module], style: str = "kohya") -> dict[str, PartNames]:
    """Naming for each part of a pipeline (``{"unet": …, "text_encoder": …, "text_encoder_2": …}``);
    with two text encoders (SDXL) the first writes ``lora_te1``; an SD3 / Flux pipeline (a ``transformer``
    part) names its text encoders as :func:`~.dit_names.text_encoder_prefixes` says."""
    if "transformer" in parts:
        naming = {}
        for role, module in parts.items():
            names = part_names(module, role, style=style)
            if role != "transformer":
                names.prefix, names.read_prefixes = text_encoder_prefixes(role, module, set(parts))
            naming[role] = names
        return naming
    naming = {}
    for role, module in parts.items():
        prefix = SDXL_TEXT_ENCODER_PREFIX if role == "text_encoder" and "text_encoder_2" in parts else None
        names = part_names(module, role)
        if prefix is not None:
            names.prefix = prefix
        naming[role] = names
    return naming


def route_keys(keys: list[str], naming: Mapping[str, PartNames]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Assign single-file module keys to parts: ``({role: {key: module name}}, unmatched keys)``."""
    routed: dict[str, dict[str, str]] = {role: {} for role in naming}
    unmatched = []
    for key in keys:
        for role, names in naming.items():
            if names.owns(key):
                module = names.module_for_key(key)
                if module is not None:
                    routed[role][key] = module
                    break
        else:
            unmatched.append(key)
    return routed, unmatched
