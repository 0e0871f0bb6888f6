"""Reading adapter files for the tools, with or without the base model.

Every adapter is read by the library's own readers (:func:`~beyondlora.formats.single_file.plan_from_single_file`,
:func:`~beyondlora.formats.folder.plan_from_folder`), which resolve module keys, check shapes and apply
the consumer's formula alpha / rank; they run against a :func:`~beyondlora.tools.model_files.skeleton` of
stand-in layers instead of a real model:

- with a base checkpoint, the skeleton of its modules (keys that match no module are an error: an
  adapter for another model);
- without one, a *virtual* skeleton whose layer shapes are inferred from the adapter's own tensors
  (each algorithm's ``file_weight_shape``).  Single-file modules are then named by their file keys.  Everything
  that does not depend on the base weight is exact this way; (IA)³ and DoRA need the base for ΔW;
- for a single file we wrote, the skeleton its metadata records (:func:`recorded_model`: every module's path
  and layer), which is all that converting it into a PEFT folder needs.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from ..algorithms import ALGORITHMS, Adapter
from ..errors import FormatError
from ..formats.folder import KEY_PREFIX, WEIGHTS_NAME, adapter_tensor_name, plan_from_folder, read_config
from ..formats.layer_records import layer_record, standin_layer
from ..formats.lycoris_codecs import detect_algorithm, single_file_tensor_names
from ..formats.names import diffusers_to_sgm, flat, sgm_block_table
from ..formats.saved_modules import SAVED_KEY
from ..formats.single_file import MODULES_METADATA, group_by_module, plan_from_single_file, read_metadata
from ..formats.tensors import read_tensors, write_tensors
from .diffusers_layout import is_diffusers_layout, to_single_file
from .model_files import Checkpoint, Component, Module, TensorInfo, module_tree, skeleton


@dataclass
class LoadedAdapter:
    """An adapter file read against a (real or virtual) model: one :class:`Adapter` per module."""

    path: Path
    kind: str  # "single_file", "diffusers" (diffusers' LoRA layout) or "peft_folder"
    metadata: dict[str, str]
    adapters: dict[str, Adapter]  # module name -> adapter (multiplier 1, the consumer's ΔW)
    layers: dict[str, nn.Module]  # module name -> its stand-in layer
    save_states: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # PEFT modules_to_save


def adapter_kind(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"adapter not found: {path}")
    if path.is_dir():
        return "peft_folder"
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: an adapter is a .safetensors file or a PEFT adapter folder")
    return "single_file"


_VIRTUAL = Component("", "", "", False)


def _virtual_module(name: str, shape: tuple[int, ...], has_bias: bool) -> Module:
    """A stand-in module of canonical ``shape`` (stored transposed where the name says embedding)."""
    probe = Module(name, TensorInfo(Path(), "", shape, torch.float32), None, _VIRTUAL)
    stored = tuple(reversed(shape)) if probe.is_embedding else shape
    bias = TensorInfo(Path(), "", (shape[0],), torch.float32)
    return Module(name, TensorInfo(Path(), "", stored, torch.float32), bias if has_bias else None, _VIRTUAL)


def _adapter_modules(path: Path, shown: Path) -> dict[str, dict[str, Tensor]]:
    """A single file's tensors by module key; a file holding tensors no adapter has (a model checkpoint)
    raises naming one (``shown``: the path the user gave)."""
    grouped = group_by_module(read_tensors(path))
    if not grouped:
        raise FormatError(f"{shown} holds no tensors")
    names = single_file_tensor_names()
    for key, params in grouped.items():
        unknown = sorted(n for n in params if n not in names and key != SAVED_KEY)
        if unknown:
            raise FormatError(
                f"{shown} is not an adapter: module key {key!r} has tensors {unknown[:4]} that no adapter has "
                "(a model checkpoint rather than an adapter?)"
            )
    return grouped


def _saved_stand_ins(saved: dict[str, Tensor]) -> list[Module]:
    """Stand-in modules for whole modules saved beside an adapter (``<module path>.<tensor name>`` → tensor)."""
    by_module: dict[str, dict[str, Tensor]] = {}
    for key, tensor in saved.items():
        name, _, param = key.rpartition(".")
        by_module.setdefault(name, {})[param] = tensor
    modules = []
    for name, params in by_module.items():
        if "weight" in params:
            info = TensorInfo(Path(), "", tuple(params["weight"].shape), params["weight"].dtype)
            bias = params.get("bias")
            bias_info = None if bias is None else TensorInfo(Path(), "", tuple(bias.shape), bias.dtype)
            modules.append(Module(name, info, bias_info, _VIRTUAL))
    return modules


def _virtual_single_file(path: Path, shown: Path) -> list[Module]:
    grouped = _adapter_modules(path, shown)
    modules = _saved_stand_ins(grouped.pop(SAVED_KEY, {}))
    for key, params in grouped.items():
        where = f"{path}: {key}"
        shape, has_bias = detect_algorithm(params, where).file_weight_shape(params, where)
        modules.append(_virtual_module(key, shape, has_bias))
    return modules


def recorded_model(path: Path) -> nn.Module | None:
    """The model a single file we wrote records in its metadata: a stand-in layer at every adapted module's
    path (:func:`~beyondlora.formats.layer_records.standin_layer`), and at every module it saves whole
    (``modules_to_save``, shaped as its tensors).  ``None`` when the file does not record every module's path
    and layer (LyCORIS' and kohya's files, ours before they did), or when a key is not its recorded path
    flattened (then only the base model can name the modules).  A file adapting several models (prefixes
    ``lora_unet``, ``lora_te``) raises: a PEFT folder holds one."""
    records = json.loads(read_metadata(path).get(MODULES_METADATA, "{}"))
    if not records:  # not a file we wrote: its tensors need not even be an adapter's (diffusers' layout)
        return None
    grouped = _adapter_modules(path, path)
    saved = grouped.pop(SAVED_KEY, {})
    layers, prefixes = {}, set()
    for key in grouped:
        record = records.get(key, {})
        name, layer = record.get("module"), record.get("layer")
        flat_name = name.replace(".", "_") if isinstance(name, str) else None
        if flat_name is None or layer is None or not (key == flat_name or key.endswith("_" + flat_name)):
            return None
        prefixes.add(key[: -len(flat_name)].rstrip("_"))
        layers[name] = standin_layer(layer, f"{path}: {key}")
    if len(prefixes) > 1:
        raise ValueError(
            f"{path} adapts several models ({', '.join(sorted(prefixes))}); a PEFT folder holds one model: "
            "save each model's adapter on its own"
        )
    for module in _saved_stand_ins(saved):
        layers[module.name] = standin_layer(layer_record(module.geometry), f"{path}: {SAVED_KEY}.{module.name}")
    return module_tree(layers)


def _virtual_folder(directory: Path) -> list[Module]:
    config = read_config(directory)
    tensors = read_tensors(directory / WEIGHTS_NAME)
    by_module: dict[str, dict[str, Tensor]] = {}
    saved: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise FormatError(f"{directory / WEIGHTS_NAME}: key {key!r} does not start with {KEY_PREFIX!r}")
        rest = key[len(KEY_PREFIX) :]
        tensor_name = adapter_tensor_name(rest)
        if tensor_name is not None and rest != tensor_name:
            by_module.setdefault(rest[: -len(tensor_name) - 1], {})[tensor_name] = tensor
        else:
            saved[rest] = tensor
    modules = []
    for name, params in by_module.items():
        cls = ALGORITHMS[config.algorithm]
        renamed = cls.from_folder(params, config.options_for(name), None)
        shape, has_bias = cls.file_weight_shape(renamed, f"{directory}: module {name!r}")
        modules.append(_virtual_module(name, shape, has_bias))
    return modules + _saved_stand_ins(saved)


#: CLIP text-encoder keys written without the ``text_model`` level (LyCORIS or PEFT on transformers 5)
_TEXT_MODEL_MISSING = re.compile(r"^(lora_te[12]?)_(encoder|embeddings|final_layer_norm)_")


def single_file_tensors(path: Path, modules: dict[str, str] | None = None) -> tuple[dict[str, Tensor], str, bool]:
    """A single file's tensors under single-file keys, its kind (``single_file``, or ``diffusers`` for
    diffusers' LoRA layout, converted), and whether any key was rewritten.

    Text-encoder keys get the ``text_model`` level UIs expect (``lora_te_encoder_layers_0_…`` →
    ``lora_te_text_model_encoder_layers_0_…``), so files written either way read the same; module keys
    found in ``modules`` (see :func:`sgm_module_keys`) are renamed.
    """
    tensors = read_tensors(path)
    kind = "single_file"
    if is_diffusers_layout(list(tensors)):
        tensors, kind = to_single_file(tensors, read_metadata(path), path), "diffusers"
    renamed = {_renamed(with_text_model(key), modules or {}): tensor for key, tensor in tensors.items()}
    return renamed, kind, kind == "diffusers" or list(renamed) != list(tensors)


def _renamed(key: str, modules: dict[str, str]) -> str:
    module, dot, rest = key.partition(".")
    return modules.get(module, module) + dot + rest


def sgm_module_keys(checkpoint: Checkpoint | None) -> dict[str, str]:
    """``lora_unet_<diffusers path>`` → ``lora_unet_<SGM path>`` for a single-file SD checkpoint.

    Such a checkpoint names its UNet modules as the original (SGM) code does (``input_blocks.1.1…``),
    while kohya's SD 1.x/2.x files use diffusers paths (``down_blocks.0.attentions.0…``).  The table
    comes from a small UNet of the same block layout (SDXL when the checkpoint has ``label_emb``); the
    channel widths do not change module names.
    """
    if checkpoint is None or checkpoint.is_folder:
        return {}
    names = [m.name for m in checkpoint.modules.values() if m.component.key_prefix == "model.diffusion_model."]
    if not names:
        return {}
    from diffusers import UNet2DConditionModel

    sdxl = any(name.startswith("unet.label_emb.") for name in names)
    layout = dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2)
    if sdxl:
        layout.update(
            block_out_channels=(8, 8, 8),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time",
            addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=8,
        )
    unet = UNet2DConditionModel(**layout)
    table = sgm_block_table(unet)
    renames = {}
    for name, _ in unet.named_modules():
        sgm = diffusers_to_sgm(name, table) if name else None
        if sgm is not None and sgm != name:
            renames[f"lora_unet_{flat(name)}"] = f"lora_unet_{flat(sgm)}"
    return renames


def with_text_model(key: str) -> str:
    """A single-file (module) key with the ``text_model`` level a CLIP text encoder's keys need."""
    return _TEXT_MODEL_MISSING.sub(r"\1_text_model_\2_", key)


def renamed_metadata(metadata: dict[str, str], modules: dict[str, str] | None = None) -> dict[str, str]:
    """Metadata with our per-module records keyed as :func:`single_file_tensors` renames the modules."""
    out = dict(metadata)
    if MODULES_METADATA in out:
        recorded = json.loads(out[MODULES_METADATA])
        renamed = {_renamed(with_text_model(k), modules or {}): v for k, v in recorded.items()}
        if list(renamed) != list(recorded):  # else the record stays as written
            out[MODULES_METADATA] = json.dumps(renamed, separators=(",", ":"))
    return out


@contextlib.contextmanager
def readable_file(path: Path, kind: str, modules: dict[str, str] | None = None) -> Iterator[tuple[Path, str]]:
    """``(file the library's readers can read, kind)``: a single file whose keys :func:`single_file_tensors`
    rewrites (diffusers' layout among them) is written to a temporary file first."""
    if kind != "single_file":
        yield path, kind
        return
    tensors, kind, rewritten = single_file_tensors(path, modules)
    if not rewritten:
        yield path, kind
        return
    with tempfile.TemporaryDirectory() as directory:
        converted = Path(directory) / path.name
        write_tensors(converted, tensors, renamed_metadata(read_metadata(path), modules))
        yield converted, kind


def load_adapter(path: str | Path, checkpoint: Checkpoint | None = None) -> LoadedAdapter:
    """Read the adapter at ``path`` against ``checkpoint`` (or, without one, against its own shapes).

    ``path``: a single file (LyCORIS / kohya / beyondlora keys, or diffusers' LoRA layout) or a PEFT folder.
    """
    path = Path(path)
    with readable_file(path, adapter_kind(path), sgm_module_keys(checkpoint)) as (source, kind):
        if checkpoint is None:
            modules = _virtual_folder(source) if kind == "peft_folder" else _virtual_single_file(source, path)
            candidates = [("", skeleton(modules))]
        elif kind != "peft_folder":
            _adapter_modules(source, path)
            candidates = [("", skeleton(list(checkpoint.modules.values())))]
        else:  # a PEFT folder adapts one model: try each component of the checkpoint
            candidates = []
            for root in checkpoint.roots:
                modules = [m for m in checkpoint.modules.values() if m.component.root == root]
                candidates.append((root, skeleton(modules, strip=root)))
        try:
            return _plan(path, source, kind, candidates, checkpoint)
        except FormatError as error:
            raise FormatError(str(error).replace(str(source), str(path))) from None


def _plan(
    path: Path, source: Path, kind: str, candidates: list[tuple[str, nn.Module]], checkpoint: Checkpoint | None
) -> LoadedAdapter:
    errors = []
    for root, model in candidates:
        try:
            if kind == "peft_folder":
                config, planned, save_states = plan_from_folder(model, source)
                metadata = {"adapter_config": json.dumps(config.to_dict(), sort_keys=True)}
            else:
                (planned, save_states), metadata = plan_from_single_file(model, source), read_metadata(path)
        except (FormatError, ValueError, TypeError) as error:
            errors.append((root, str(error)))
            continue
        lead = f"{root}." if root else ""
        return LoadedAdapter(
            path,
            kind,
            metadata,
            {lead + p.name: p.adapter for p in planned},
            {lead + p.name: p.module for p in planned},
            {lead + name: state for name, state in save_states.items()},
        )
    where = f" (model: {checkpoint.path})" if checkpoint is not None else ""
    if len(errors) == 1:
        raise FormatError(errors[0][1] + where)
    raise FormatError(
        f"{path} matches no component of {checkpoint.path if checkpoint else 'the model'}: "
        + "; ".join(f"{root}: {message}" for root, message in errors)
    )
