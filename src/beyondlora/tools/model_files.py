"""Model checkpoints as streams of tensors, for the command-line tools.

A checkpoint is a diffusers model folder, a single-file Stable Diffusion checkpoint, or any safetensors
state dict.  Only the headers are read up front (every key's shape and dtype); tensors are then read one at
a time through ``safetensors.safe_open``, so no tool ever holds a whole model, let alone two.

**Modules.** A module is a ``<name>.weight`` key of a floating dtype and 1 to 5 dimensions, with
``<name>.bias`` when present.  Its geometry follows from the shape alone
(:func:`~beyondlora.ops.geometry.weight_geometry`): 1-D a norm's scale, 2-D linear (an embedding table when
the last name segment says ``embed``), 3/4/5-D a convolution.  Its key in a single adapter file is
``module_key(prefix, name)``:

============================  =====================================  ==========================
checkpoint                    state-dict key                          single-file module key
============================  =====================================  ==========================
diffusers pipeline folder     ``unet/…``: ``down_blocks.0.….weight``  ``lora_unet_down_blocks_0_…``
                              ``text_encoder/…``: ``text_model.…``    ``lora_te_text_model_…``
                              (SDXL: ``text_encoder``, ``_2``)        (``lora_te1_…``, ``lora_te2_…``)
diffusers component folder    ``unet/``: ``down_blocks.0.….weight``   ``lora_unet_down_blocks_0_…``
SD single-file checkpoint     ``model.diffusion_model.input_…``       ``lora_unet_input_…``
                              ``cond_stage_model.transformer.…``      ``lora_te_text_model_…``
                              ``conditioner.embedders.0.transformer``  ``lora_te1_text_model_…``
any other state dict          ``blocks.0.attn.weight``                ``lycoris_blocks_0_attn``
============================  =====================================  ==========================

Other keys of an SD checkpoint (the VAE, SD2 / SDXL OpenCLIP encoders, EMA copies) are no module here:
the tools copy them unchanged.  :func:`skeleton` builds an ``nn.Module`` tree of stand-in layers (weights
are zero-stride views, no memory) so the library's adapter readers resolve and check file keys exactly as
they would against the real model.
"""

from __future__ import annotations

import contextlib
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from ..formats.names import CLIP_TEXT_MODEL_CHILDREN
from ..ops.geometry import LayerGeometry, weight_geometry

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_DTYPE_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
#: state-dict key prefixes of a single-file Stable Diffusion checkpoint → component root
SD_COMPONENTS = {
    "model.diffusion_model.": "unet",
    "cond_stage_model.transformer.": "te",
    "conditioner.embedders.0.transformer.": "te1",
}
#: diffusers subfolder → component root
DIFFUSERS_COMPONENTS = {"unet": "unet", "transformer": "transformer", "text_encoder": "te", "text_encoder_2": "te2"}
_EMBEDDING_NAME = re.compile(r"(.*_)?embeddings?|embed_tokens|wte|wpe")
TEXT_ENCODER_PREFIXES = ("lora_te", "lora_te1", "lora_te2")
#: children of a CLIP text model that checkpoints (and UIs' keys) put under ``text_model``; transformers 5
#: saves them without that level


def module_name(component: Component, local: str) -> str:
    """The module name of state-dict key stem ``local`` in ``component`` (a CLIP text encoder's keys get
    the ``text_model.`` level back, so single-file keys read ``lora_te_text_model_encoder_…``)."""
    if component.prefix in TEXT_ENCODER_PREFIXES and local.split(".", 1)[0] in CLIP_TEXT_MODEL_CHILDREN:
        local = f"text_model.{local}"
    return f"{component.root}.{local}" if component.root else local


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start: int = 0  # byte range of its data in the file
    end: int = 0


@dataclass(frozen=True)
class Component:
    """A part of a checkpoint whose modules share a single-file prefix."""

    root: str  # module-name prefix in the skeleton ("unet"); "" when the checkpoint is one component
    prefix: str  # single-file prefix of its modules ("lora_unet", "lycoris")
    key_prefix: str  # state-dict key prefix ("model.diffusion_model."), "" in folders
    extract: bool  # whether extraction looks at it (not the VAE)
    diffusers_name: str | None = None  # its name in a diffusers pipeline ("unet", "text_encoder")


@dataclass(frozen=True)
class Module:
    name: str  # the skeleton name, e.g. "unet.down_blocks.0.resnets.0.conv1"
    weight: TensorInfo
    bias: TensorInfo | None
    component: Component

    @property
    def is_embedding(self) -> bool:
        """A 2-D weight named like an embedding table (``token_embedding``, ``word_embeddings``,
        ``embed_tokens``, ``wte``); ``context_embedder`` and ``time_embedding.linear_1`` stay linear."""
        last = self.name.rsplit(".", 1)[-1].lower()
        return len(self.weight.shape) == 2 and _EMBEDDING_NAME.fullmatch(last) is not None

    @property
    def geometry(self) -> LayerGeometry:
        return weight_geometry(self.weight.shape, self.bias is not None, self.is_embedding)


@dataclass(frozen=True)
class ModelFile:
    path: Path
    relative: Path  # where it lives inside the checkpoint ("unet/diffusion_pytorch_model.safetensors")
    tensors: dict[str, TensorInfo]  # in file order
    metadata: dict[str, str]
    components: tuple[Component, ...]

    def component_of(self, key: str) -> Component | None:
        matches = [c for c in self.components if key.startswith(c.key_prefix)]
        return max(matches, key=lambda c: len(c.key_prefix)) if matches else None


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Shapes, dtypes and byte ranges of every tensor of a safetensors file, and its metadata.

    safetensors itself validates the file (header, coverage of the data); no tensor is read.
    """
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        with open(path, "rb") as raw:
            (length,) = struct.unpack("<Q", raw.read(8))
            header = json.loads(raw.read(length))
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None
    header.pop("__metadata__", None)
    infos = {}
    for key, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
        start, end = (8 + length + offset for offset in entry["data_offsets"])
        infos[key] = TensorInfo(path, key, tuple(entry["shape"]), dtype, start, end)
    return infos, metadata


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of one component folder: plain (possibly sharded) safetensors, else one variant."""
    files = sorted(folder.glob("*.safetensors"))
    plain = [f for f in files if "." not in f.name[: -len(".safetensors")]]
    if plain or not files:
        return plain
    variants = sorted({f.name.split(".")[1].split("-")[0] for f in files})
    if len(variants) > 1:
        raise ValueError(f"{folder}: several weight variants {variants}; keep one")
    return files


class Checkpoint:
    """Headers of a model checkpoint (see the module docstring) and its module table."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"model not found: {self.path}")
        self.is_folder = self.path.is_dir()
        self.files: list[ModelFile] = []
        if self.is_folder:
            self._read_folder()
        else:
            self._read_file()
        self.modules = self._module_table()
        if not self.modules:
            raise ValueError(f"{self.path}: no weight tensors (keys ending in .weight) found")
        roots = {c.root for f in self.files for c in f.components}
        #: the single-file prefix for skeleton names: components carry their own part of it
        self.prefix = "lora" if roots != {""} else self.files[0].components[0].prefix

    def _read_file(self) -> None:
        tensors, metadata = read_header(self.path)
        if any(k.startswith("model.diffusion_model.") for k in tensors):
            components = tuple(
                Component(root, f"lora_{root}", key_prefix, True, None) for key_prefix, root in SD_COMPONENTS.items()
            )
        else:
            components = (Component("", "lycoris", "", True),)
        self.files.append(ModelFile(self.path, Path(self.path.name), tensors, metadata, components))

    def _read_folder(self) -> None:
        direct = _weight_files(self.path)
        if direct:
            name = self.path.name
            root = DIFFUSERS_COMPONENTS.get(name)
            component = Component("", f"lora_{root}" if root else "lycoris", "", True, name if root else None)
            for file in direct:
                self._add(file, (component,))
            return
        folders = sorted(p for p in self.path.iterdir() if p.is_dir() and _weight_files(p))
        if not folders:
            found = sorted(p.name for p in self.path.rglob("*.bin"))[:3]
            hint = f" (only .bin files such as {found}: convert them to safetensors first)" if found else ""
            raise ValueError(f"{self.path}: no safetensors weights found{hint}")
        names = {p.name for p in folders}
        for folder in folders:
            root = DIFFUSERS_COMPONENTS.get(folder.name)
            if folder.name == "text_encoder" and "text_encoder_2" in names:
                root = "te1"
            extract = root is not None
            diffusers_name = folder.name if extract else None
            component = Component(root or folder.name, f"lora_{root or folder.name}", "", extract, diffusers_name)
            for file in _weight_files(folder):
                self._add(file, (component,))

    def _add(self, file: Path, components: tuple[Component, ...]) -> None:
        tensors, metadata = read_header(file)
        self.files.append(ModelFile(file, file.relative_to(self.path), tensors, metadata, components))

    def _module_table(self) -> dict[str, Module]:
        table: dict[str, Module] = {}
        # shards of one component: a module's bias may sit in another file than its weight
        everywhere = {(c.root, key): info for f in self.files for key, info in f.tensors.items() for c in f.components}
        for model_file in self.files:
            for key, info in model_file.tensors.items():
                component = model_file.component_of(key)
                if component is None or not key.endswith(".weight") or not info.dtype.is_floating_point:
                    continue
                if not 1 <= len(info.shape) <= 5:
                    continue
                name = module_name(component, key[len(component.key_prefix) : -len(".weight")])
                if name in table:
                    raise ValueError(f"{self.path}: module {name!r} appears in two files")
                bias = everywhere.get((component.root, key[: -len("weight")] + "bias"))
                table[name] = Module(name, info, bias, component)
        return table

    def module_of(self, model_file: ModelFile, key: str) -> Module | None:
        """The module a key belongs to (as its weight or bias), if any."""
        component = model_file.component_of(key)
        if component is None:
            return None
        stem, _, param = key.rpartition(".")
        if param not in ("weight", "bias"):
            return None
        module = self.modules.get(module_name(component, stem[len(component.key_prefix) :]))
        info = None if module is None else module.weight if param == "weight" else module.bias
        # a shard may hold a module's weight and another its bias
        return module if info is not None and info.file == model_file.path and info.key == key else None

    def other_files(self) -> list[Path]:
        """Files of a folder checkpoint that are not weights read here (configs, tokenizers, variants)."""
        if not self.is_folder:
            return []
        weights = {f.path.resolve() for f in self.files}
        return sorted(p for p in self.path.rglob("*") if p.is_file() and p.resolve() not in weights)

    @property
    def roots(self) -> list[str]:
        return sorted({c.root for f in self.files for c in f.components})


class TensorReader(contextlib.AbstractContextManager):
    """Reads single tensors from any number of safetensors files (their byte ranges from :func:`read_header`).

    Plain reads rather than a memory map: a map would keep every page it touched resident in the process,
    so reading a whole model through it would hold the whole model; here only live tensors take memory.
    """

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._handles: dict[Path, Any] = {}

    def get(self, info: TensorInfo) -> Tensor:
        handle = self._handles.get(info.file)
        if handle is None:
            handle = self._handles[info.file] = self._stack.enter_context(open(info.file, "rb"))
        tensor = torch.empty(info.shape, dtype=info.dtype)
        size = info.end - info.start
        if size:
            handle.seek(info.start)
            if handle.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != size:
                raise ValueError(f"{info.file}: tensor {info.key!r} is cut short (the file changed while reading?)")
        return tensor

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


def canonical(tensor: Tensor, geometry: LayerGeometry) -> Tensor:
    """A stored weight as the canonical ``(out, in, *kernel)`` weight (embeddings store the transpose)."""
    return tensor.t() if geometry.kind == "embedding" else tensor


def _standin(module: Module) -> nn.Module:
    """A layer of the module's type on the meta device, its weight and bias zero-stride CPU views."""
    g, has_bias = module.geometry, module.bias is not None
    with torch.device("meta"):
        if g.kind == "linear":
            layer: nn.Module = nn.Linear(g.in_dim, g.out_dim, bias=has_bias)
        elif g.kind == "embedding":
            layer = nn.Embedding(g.in_dim, g.out_dim)
        elif g.kind == "conv":
            conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(g.kernel)]
            layer = conv(g.in_dim, g.out_dim, g.kernel, bias=has_bias)
        else:
            layer = nn.LayerNorm(g.out_dim, bias=has_bias)
    zero = torch.zeros((), dtype=module.weight.dtype)
    layer.weight = nn.Parameter(zero.expand(module.weight.shape), requires_grad=False)
    if has_bias:
        layer.bias = nn.Parameter(zero.to(module.bias.dtype).expand(module.bias.shape), requires_grad=False)
    return layer


def skeleton(modules: list[Module], strip: str = "") -> nn.Module:
    """An ``nn.Module`` tree with a stand-in layer at every module name (``strip``: a root to leave out)."""
    return module_tree({(m.name[len(strip) + 1 :] if strip else m.name): _standin(m) for m in modules})


def module_tree(layers: dict[str, nn.Module]) -> nn.Module:
    """An ``nn.Module`` tree holding each layer at its dotted name (parents are plain modules)."""
    model = nn.Module()
    for name in sorted(layers, key=lambda n: n.count(".")):
        *parents, leaf = name.split(".")
        node = model
        for part in parents:
            child = node._modules.get(part)
            if child is None:
                child = nn.Module()
                node.add_module(part, child)
            node = child
        existing = node._modules.get(leaf)
        layer = layers[name]
        if existing is not None:  # created as a parent of a deeper module first: keep its children
            for child_name, child in existing.named_children():
                layer.add_module(child_name, child)
        node.add_module(leaf, layer)
    return model


class StreamingWriter:
    """Writes a safetensors file one tensor at a time (the layout is declared up front).

    The format: an 8-byte little-endian header length, a JSON header ``{key: {dtype, shape, data_offsets}}``
    (padded with spaces to a multiple of 8), then the tensors' bytes back to back in declared order.
    """

    def __init__(self, path: Path, layout: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str]):
        header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
        offset = 0
        self._expected = []
        for key, dtype, shape in layout:
            size = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._expected.append((key, dtype, tuple(shape)))
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._handle = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
        self._position = 0
        self.total_bytes = offset

    def write(self, key: str, tensor: Tensor) -> None:
        expected_key, dtype, shape = self._expected[self._position]
        if key != expected_key or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise RuntimeError(
                f"streaming writer: got {key} {tensor.dtype} {tuple(tensor.shape)}, expected "
                f"{expected_key} {dtype} {shape}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            self._handle.write(data.view(torch.uint8).numpy().tobytes())
        self._position += 1

    def close(self) -> None:
        self._handle.close()
        if self._position != len(self._expected):
            raise RuntimeError(f"streaming writer: {len(self._expected) - self._position} tensor(s) never written")


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count
