"""Pictures of a run, drawn with Pillow only: sample grids and the loss curve."""

from __future__ import annotations

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


def save_loss_curve(steps: list[int], losses: list[float], path: str | Path, smooth: int = 10) -> Path:
    """Write the loss per step (light) and its running mean over ``smooth`` steps (dark) as a PNG."""
    from PIL import Image, ImageDraw

    width, height, margin = 480, 280, 40
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    draw.rectangle((margin, 10, width - 10, height - margin), outline=_INK)
    if steps:
        low, high = min(losses), max(losses)
        high = high if high > low else low + 1.0
        first, last = steps[0], max(steps[-1], steps[0] + 1)

        def point(step: float, value: float) -> tuple[float, float]:
            x = margin + (step - first) / (last - first) * (width - 10 - margin)
            y = height - margin - (value - low) / (high - low) * (height - margin - 10)
            return x, y

        draw.line([point(s, v) for s, v in zip(steps, losses, strict=True)], fill=(170, 190, 230), width=1)
        means = [
            sum(losses[max(0, i - smooth + 1) : i + 1]) / len(losses[max(0, i - smooth + 1) : i + 1])
            for i in range(len(losses))
        ]
        draw.line([point(s, v) for s, v in zip(steps, means, strict=True)], fill=(20, 60, 160), width=2)
        draw.text((2, 8), f"{high:.3g}", fill=_INK)
        draw.text((2, height - margin - 10), f"{low:.3g}", fill=_INK)
        draw.text((margin, height - margin + 4), str(first), fill=_INK)
        draw.text((width - 50, height - margin + 4), str(steps[-1]), fill=_INK)
    draw.text((width // 2 - 40, height - 18), "step  (loss)", fill=_INK)
    path = Path(path)
    with atomic_path(path) as temporary:
        sheet.save(temporary, format="PNG")
    return path
