"""Pictures of a run, drawn with Pillow only: sample grids and the loss curve."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import torch

from ..formats.atomic import atomic_path

_BACKGROUND = (255, 255, 255)
_INK = (30, 30, 30)


def _to_pil(image: torch.Tensor, scale: int):  # (3, H, W) in [0, 1]
    from PIL import Image

    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    picture = Image.fromarray(array)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Write one image (3, H, W) in [0, 1] as a PNG at its own size."""
    path = Path(path)
    with atomic_path(path) as temporary:
        _to_pil(image, 1).save(temporary, format="PNG")
    return path


def save_grid(
    rows: list[torch.Tensor],
    path: str | Path,
    labels: list[str] | None = None,
    row_labels: list[str] | None = None,
    cell: int = 80,
) -> Path:
    """Write rows of images (each (N, 3, H, W) in [0, 1]) as one PNG, with column and row labels."""
    from PIL import Image, ImageDraw

    columns = max(len(row) for row in rows)
    height, width = rows[0].shape[-2:]
    scale = max(1, cell // max(height, width))
    cw, ch = width * scale, height * scale
    width_chars = max(4, cw // 6)
    wrapped = [textwrap.wrap(label, width_chars)[:2] or [""] for label in labels or []]
    top = 12 * max(len(lines) for lines in wrapped) + 2 if wrapped else 0
    left = 60 if row_labels else 0
    sheet = Image.new("RGB", (left + columns * (cw + 2), top + len(rows) * (ch + 2)), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for c, lines in enumerate(wrapped):
        for number, line in enumerate(lines):
            draw.text((left + c * (cw + 2) + 1, 1 + 12 * number), line, fill=_INK)
    for r, row in enumerate(rows):
        if row_labels:
            draw.text((2, top + r * (ch + 2) + ch // 2 - 5), row_labels[r], fill=_INK)
        for c, image in enumerate(row):
            sheet.paste(_to_pil(image, scale), (left + c * (cw + 2), top + r * (ch + 2)))
    path = Path(path)
    with atomic_path(path) as temporary:
        sheet.save(temporary, format="PNG")
    return path


def save_sample_grid(images: torch.Tensor, prompts: list[str], seeds: list[int], path: str | Path) -> Path:
    """Seed-major samples (len(seeds) · len(prompts), 3, H, W) as a grid: prompts across, seeds down."""
    rows = list(images.split(len(prompts)))
    return save_grid(rows, path, labels=prompts, row_labels=[f"seed {s}" for s in seeds])


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values in [low, high]: every multiple of a step of 1, 2 or 5 × 10^k, the smallest such step
    that gives at most about ``count`` ticks."""
    raw = (high - low) / count or abs(high) or 1.0
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    first = math.ceil(low / step - 1e-9)
    return [round(k * step, 12) for k in range(first, math.floor(high / step + 1e-9) + 1)]


def loss_axis(losses: list[float]) -> tuple[bool, list[float]]:
    """``(log scale, tick values)`` for a loss axis: logarithmic when the losses span more than two decades,
    with ticks at the powers of ten (and 2×, 5× where fewer than three fit); else linear :func:`nice_ticks`."""
    low, high = min(losses), max(losses)
    if low > 0 and high / low > 100:
        decades = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
        ticks = [10.0**d for d in decades if low <= 10.0**d <= high]
        if len(ticks) < 3:
            ticks = sorted(m * 10.0**d for d in decades for m in (1, 2, 5) if low <= m * 10.0**d <= high)
        return True, ticks
    return False, nice_ticks(low, high if high > low else low + 1.0)


def save_loss_curve(steps: list[int], losses: list[float], path: str | Path, smooth: int = 10) -> Path:
    """Write the loss per step (light) and its running mean over ``smooth`` steps (dark) as a PNG, with a title,
    labelled axes, tick marks and grid lines (a log-scale loss axis when the losses span decades)."""
    from PIL import Image, ImageDraw

    width, height, left, top, bottom, right = 560, 320, 56, 30, 44, 14
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.text((left, 8), f"training loss: per step (light), mean of the last {smooth} steps (dark)", fill=_INK)
    draw.rectangle((left, top, width - right, height - bottom), outline=_INK)
    if steps:
        log, y_ticks = loss_axis(losses)
        scale = (lambda v: math.log10(v)) if log else (lambda v: v)
        low, high = scale(min(losses + y_ticks)), scale(max(losses + y_ticks))
        high = high if high > low else low + 1.0
        first, last = steps[0], max(steps[-1], steps[0] + 1)

        def point(step: float, value: float) -> tuple[float, float]:
            x = left + (step - first) / (last - first) * (width - right - left)
            y = height - bottom - (scale(value) - low) / (high - low) * (height - bottom - top)
            return x, y

        for tick in y_ticks:
            _, y = point(first, tick)
            draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
            draw.text((4, y - 6), f"{tick:.3g}", fill=_INK)
        for tick in nice_ticks(first, last):
            x, _ = point(tick, losses[0])
            draw.line([(x, top), (x, height - bottom)], fill=(225, 225, 225))
            draw.text((x - 8, height - bottom + 4), f"{tick:g}", fill=_INK)
        draw.line([point(s, v) for s, v in zip(steps, losses, strict=True)], fill=(170, 190, 230), width=1)
        means = [
            sum(losses[max(0, i - smooth + 1) : i + 1]) / len(losses[max(0, i - smooth + 1) : i + 1])
            for i in range(len(losses))
        ]
        draw.line([point(s, v) for s, v in zip(steps, means, strict=True)], fill=(20, 60, 160), width=2)
        draw.rectangle((left, top, width - right, height - bottom), outline=_INK)
        draw.text((4, top - 14), "loss (log)" if log else "loss", fill=_INK)
    draw.text((width // 2 - 10, height - 16), "step", fill=_INK)
    path = Path(path)
    with atomic_path(path) as temporary:
        sheet.save(temporary, format="PNG")
    return path
