"""Training data: kohya folders or an imagefolder with ``metadata.jsonl``, buckets, augmentation, caches.

Layouts read by :func:`scan_dataset`:

* **kohya**: images with same-name caption files (``.txt``) in the folder and in subfolders; a subfolder
  named ``N_name`` repeats its images N times per epoch.
* **imagefolder**: a ``metadata.jsonl`` at the root, one ``{"file_name": …, "text": …}`` per line
  (``caption`` is accepted for ``text``).

Every random choice of the data (order, flips, crops, caption shuffles and dropouts) is drawn from a
generator seeded by (seed, epoch, batch), so a resumed run sees exactly the data it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..formats.tensors import write_tensors
from .settings import TrainConfigError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEATS = re.compile(r"^(\d+)_(.+)$")


class UnreadableImageWarning(UserWarning):
    """An image of the data folder could not be read and is skipped."""


@dataclass
class Item:
    """One training image: its path, caption and repeat count, and (once read) its size."""

    path: Path
    caption: str
    repeats: int = 1
    size: tuple[int, int] = (0, 0)  # (width, height)


def _kohya_items(root: Path, caption_extension: str) -> list[Item]:
    items, missing = [], []
    folders = [(root, 1)] + [
        (sub, int(m.group(1)) if (m := _REPEATS.match(sub.name)) else 1)
        for sub in sorted(root.iterdir())
        if sub.is_dir() and not sub.name.startswith(".")
    ]
    for folder, repeats in folders:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            caption_path = path.with_suffix(caption_extension)
            if not caption_path.is_file():
                missing.append(str(path))
                continue
            items.append(Item(path, caption_path.read_text().strip(), repeats))
    if missing:
        listed = ", ".join(missing[:5]) + (f" … ({len(missing)} in all)" if len(missing) > 5 else "")
        raise TrainConfigError(f"no {caption_extension} caption for image(s): {listed}")
    return items


def _metadata_items(root: Path) -> list[Item]:
    items = []
    for number, line in enumerate((root / "metadata.jsonl").read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            name, caption = record["file_name"], record.get("text", record.get("caption"))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise TrainConfigError(
                f"{root / 'metadata.jsonl'} line {number}: need a JSON object with file_name"
            ) from None
        if caption is None:
            raise TrainConfigError(f"{root / 'metadata.jsonl'} line {number}: no text (caption) for {name}")
        items.append(Item(root / name, str(caption).strip()))
    return items


def scan_dataset(folder: str | Path, caption_extension: str = ".txt") -> list[Item]:
    """The readable images of ``folder`` with captions; unreadable images are skipped with a warning."""
    from PIL import Image

    root = Path(folder)
    if not root.exists():
        raise TrainConfigError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise TrainConfigError(f"data folder {root} is not a folder")
    items = _metadata_items(root) if (root / "metadata.jsonl").is_file() else _kohya_items(root, caption_extension)
    readable = []
    for item in items:
        try:
            with Image.open(item.path) as image:
                image.load()
                item.size = image.size
            readable.append(item)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            warnings.warn(f"skipping unreadable image {item.path}: {error}", UnreadableImageWarning, stacklevel=2)
    if not readable:
        raise TrainConfigError(f"data folder {root} has no readable captioned images ({', '.join(IMAGE_EXTENSIONS)})")
    return readable


def make_buckets(resolution: int, step: int) -> list[tuple[int, int]]:
    """(width, height) pairs, multiples of ``step``, of about ``resolution``² pixels, aspect ≤ 4."""
    buckets = {(resolution, resolution)}
    side = step
    while side <= 4 * resolution:
        other = (resolution * resolution // side) // step * step
        if other >= step and max(side, other) / min(side, other) <= 4:
            buckets.update({(side, other), (other, side)})
        side += step
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def load_pixels(item: Item, bucket: tuple[int, int], crop: tuple[float, float] = (0.5, 0.5)) -> torch.Tensor:
    """The image resized to cover ``bucket`` and cropped to it at relative position ``crop``: (3, H, W)
    in [−1, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(item.path) as image:
        picture = image.convert("RGB")
    width, height = bucket
    scale = max(width / picture.width, height / picture.height)
    resized = (max(width, round(picture.width * scale)), max(height, round(picture.height * scale)))
    picture = picture.resize(resized, Image.BICUBIC)
    left = round((resized[0] - width) * crop[0])
    top = round((resized[1] - height) * crop[1])
    picture = picture.crop((left, top, left + width, top + height))
    array = torch.from_numpy(np.asarray(picture, dtype=np.float32).copy()).permute(2, 0, 1)
    return array / 127.5 - 1.0


def process_caption(caption: str, shuffle: bool, keep_tokens: int, dropout: float, generator: torch.Generator) -> str:
    """Caption dropout (→ empty) and shuffling of comma-separated tags after the first ``keep_tokens``."""
    if dropout and torch.rand((), generator=generator).item() < dropout:
        return ""
    if shuffle:
        tags = [t.strip() for t in caption.split(",")]
        kept, rest = tags[:keep_tokens], tags[keep_tokens:]
        order = torch.randperm(len(rest), generator=generator).tolist()
        caption = ", ".join(kept + [rest[i] for i in order])
    return caption


def batch_generator(seed: int, epoch: int, batch: int) -> torch.Generator:
    """The generator of one batch's random choices: a function of (seed, epoch, batch) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_003 + batch)


class BucketDataset:
    """Items assigned to buckets; an epoch is a seeded list of global batches of one bucket each."""

    def __init__(self, items: list[Item], resolution: int, step: int, enable_bucket: bool) -> None:
        self.items = items
        buckets = make_buckets(resolution, step) if enable_bucket else [(resolution, resolution)]
        self.bucket_of = [nearest_bucket(item.size, buckets) for item in items]
        self.entries = [i for i, item in enumerate(items) for _ in range(item.repeats)]

    def epoch_batches(self, seed: int, epoch: int, global_batch: int) -> list[list[int]]:
        """Global batches (item indices) of one epoch; a bucket's last partial batch wraps around."""
        generator = torch.Generator().manual_seed(seed * 7_919 + epoch)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for entry in self.entries:
            by_bucket.setdefault(self.bucket_of[entry], []).append(entry)
        batches = []
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            order = [members[i] for i in torch.randperm(len(members), generator=generator).tolist()]
            for start in range(0, len(order), global_batch):
                chunk = order[start : start + global_batch]
                while len(chunk) < global_batch:
                    chunk += order[: global_batch - len(chunk)]
                batches.append(chunk)
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


class LatentCache:
    """Latents per (item, flipped), computed once (centre crop), kept in memory and optionally on disk."""

    def __init__(self, dataset: BucketDataset, encode: Any, flips: bool, path: Path | None, model: str = "") -> None:
        self.latents: dict[str, torch.Tensor] = {}
        signature = self._signature(dataset, flips, model)
        if path is not None and path.is_file():
            from safetensors import safe_open
            from safetensors.torch import load_file

            with safe_open(str(path), "pt") as handle:
                stored = (handle.metadata() or {}).get("signature")
            if stored == signature:
                self.latents = load_file(str(path))
                return
        from tqdm.auto import tqdm

        for index in tqdm(range(len(dataset.items)), desc="caching latents", leave=False):
            pixels = load_pixels(dataset.items[index], dataset.bucket_of[index])
            for flipped in (False, True) if flips else (False,):
                image = pixels.flip(-1) if flipped else pixels
                self.latents[f"{index}:{int(flipped)}"] = encode(image[None])[0].float().contiguous()
        if path is not None:
            write_tensors(path, self.latents, {"signature": signature})

    @staticmethod
    def _signature(dataset: BucketDataset, flips: bool, model: str) -> str:
        """Changes with the images (path, time), their buckets, flipping and the base model."""
        parts = [
            f"{item.path}|{item.path.stat().st_mtime_ns}|{bucket}"
            for item, bucket in zip(dataset.items, dataset.bucket_of, strict=True)
        ]
        return hashlib.sha256(json.dumps([parts, flips, model]).encode()).hexdigest()

    def get(self, index: int, flipped: bool) -> torch.Tensor:
        return self.latents[f"{index}:{int(flipped)}"]
