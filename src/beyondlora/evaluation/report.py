"""What an evaluation writes: the CSV of every metric row, the rank-scaled summary, metric-vs-metric scatter
plots (one colour per algorithm) and grids of the generated images, all with Pillow, all atomically."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import torch

from ..formats.atomic import atomic_path
from ..training.report import nice_ticks, save_grid
from .scoring import Row, higher_is_better

COLUMNS = ("model", "algorithm", "prompt_type", "metric", "features", "value", "note")
#: the scatter plots drawn where both metrics have values: (x, y), each ``<prompt type>/<metric>``
PLOTS = (
    ("trigger/image_similarity", "style/preservation"),
    ("trigger/concept_score", "style/preservation"),
    ("trigger/image_similarity", "trigger/text_similarity"),
    ("trigger/image_similarity", "trigger/vendi"),
    ("alter/text_similarity", "style/style_loss"),
)
#: preferred features of a metric that several encoders compute, best first
FEATURE_ORDER = ("dino", "clip", "pixels", "concept")
PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def short_name(model: str, width: int) -> str:
    """``model`` without its file hash, cut to ``width`` characters from the end (where a sweep's names
    differ: step numbers, ranks)."""
    stem = re.sub(r"-[0-9a-f]{12}$", "", model)
    return stem if len(stem) <= width else "…" + stem[-(width - 1) :]


def _write_text(path: Path, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return path


def write_csv(rows: list[Row], path: Path) -> Path:
    """One line per model × prompt type × metric × features; skipped metrics have an empty value and a note."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    for row in rows:
        value = "" if row.value is None else f"{row.value:.6g}"
        writer.writerow([row.model, row.algorithm, row.prompt_type, row.metric, row.features, value, row.note])
    return _write_text(path, buffer.getvalue())


def rank_scale(values: list[float], higher_better: bool) -> list[float]:
    """Each value's rank among ``values`` scaled to [0, 1]: 1 the best, 0 the worst, ties sharing their mean
    rank (one value alone: 1).  (r − 1) / (n − 1) with r the 1-based rank from the worst."""
    n = len(values)
    if n == 1:
        return [1.0]
    order = sorted(range(n), key=lambda i: values[i] if higher_better else -values[i])
    ranks = [0.0] * n
    start = 0
    while start < n:
        end = start
        while end + 1 < n and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            ranks[order[position]] = (start + end) / 2  # 0-based, from the worst
        start = end + 1
    return [r / (n - 1) for r in ranks]


def summarise(rows: list[Row]) -> tuple[list[str], dict[str, dict[str, float]]]:
    """(metric keys, model → key → rank-scaled value) over the rows with values, per key across models."""
    by_key: dict[str, dict[str, float]] = {}
    for row in rows:
        if row.value is not None:
            by_key.setdefault(row.key, {})[row.model] = row.value
    scaled: dict[str, dict[str, float]] = {}
    for key, values in by_key.items():
        models = list(values)
        metric = key.split("/", 1)[1].split("[", 1)[0]
        for model, value in zip(models, rank_scale([values[m] for m in models], higher_is_better(metric)), strict=True):
            scaled.setdefault(model, {})[key] = value
    return sorted(by_key), scaled


def write_summary(rows: list[Row], path: Path) -> tuple[Path, dict[str, float]]:
    """The rank-scaled summary: one line per model, a column per metric key, and their mean; returns the
    path and each model's mean."""
    keys, scaled = summarise(rows)
    algorithms = {row.model: row.algorithm for row in rows}
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["model", "algorithm", "mean_rank_scaled", *keys])
    means = {}
    for model in dict.fromkeys(row.model for row in rows):
        mine = scaled.get(model, {})
        means[model] = sum(mine.values()) / len(mine) if mine else float("nan")
        cells = ["" if key not in mine else f"{mine[key]:.4g}" for key in keys]
        writer.writerow([model, algorithms[model], f"{means[model]:.4g}", *cells])
    return _write_text(path, buffer.getvalue()), means


def pick(rows: list[Row], model: str, name: str) -> tuple[float, str] | None:
    """The value of ``<prompt type>/<metric>`` for ``model`` with the preferred features, and which."""
    kind, metric = name.split("/")
    found = {
        r.features: r.value
        for r in rows
        if r.model == model and r.prompt_type == kind and r.metric == metric and r.value is not None
    }
    for features in FEATURE_ORDER:
        if features in found:
            return found[features], features
    return None


def scatter(rows: list[Row], x_name: str, y_name: str, path: Path) -> Path | None:
    """A scatter plot of ``y_name`` against ``x_name`` (``<prompt type>/<metric>``), a point per model labelled
    with its name and coloured by algorithm; None (nothing written) when fewer than two models have both."""
    from PIL import Image, ImageDraw

    models = list(dict.fromkeys(row.model for row in rows))
    algorithms = {row.model: row.algorithm for row in rows}
    points, labels = [], {}
    for model in models:
        x, y = pick(rows, model, x_name), pick(rows, model, y_name)
        if x is not None and y is not None:
            points.append((model, x[0], y[0]))
            labels = {"x": f"{x_name} [{x[1]}]", "y": f"{y_name} [{y[1]}]"}
    if len(points) < 2:
        return None
    colours = {a: PALETTE[i % len(PALETTE)] for i, a in enumerate(dict.fromkeys(algorithms[m] for m, _, _ in points))}
    width, height, left, top, bottom, right = 560, 400, 64, 30, 48, 120
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    xs, ys = [p[1] for p in points], [p[2] for p in points]

    def span(values: list[float]) -> tuple[float, float]:
        low, high = min(values), max(values)
        pad = (high - low) * 0.08 or abs(high) * 0.1 or 1.0
        return low - pad, high + pad

    (x0, x1), (y0, y1) = span(xs), span(ys)

    def at(x: float, y: float) -> tuple[float, float]:
        return (
            left + (x - x0) / (x1 - x0) * (width - left - right),
            height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom),
        )

    for tick in nice_ticks(y0, y1):
        _, py = at(x0, tick)
        draw.line([(left, py), (width - right, py)], fill=(225, 225, 225))
        draw.text((4, py - 6), f"{tick:.3g}", fill=(30, 30, 30))
    for tick in nice_ticks(x0, x1):
        px, _ = at(tick, y0)
        draw.line([(px, top), (px, height - bottom)], fill=(225, 225, 225))
        draw.text((px - 10, height - bottom + 4), f"{tick:.3g}", fill=(30, 30, 30))
    draw.rectangle((left, top, width - right, height - bottom), outline=(30, 30, 30))
    for model, x, y in points:
        px, py = at(x, y)
        draw.ellipse((px - 4, py - 4, px + 4, py + 4), fill=colours[algorithms[model]])
        draw.text((px + 6, py - 6), short_name(model, 18), fill=(60, 60, 60))
    for number, (algorithm, colour) in enumerate(colours.items()):
        draw.rectangle((width - right + 10, top + 16 * number, width - right + 20, top + 16 * number + 10), fill=colour)
        draw.text((width - right + 24, top + 16 * number), algorithm[:14], fill=(30, 30, 30))
    draw.text((left, 8), f"{labels['y']} against {labels['x']}", fill=(30, 30, 30))
    draw.text((left, height - 18), labels["x"], fill=(30, 30, 30))
    with atomic_path(path) as temporary:
        sheet.save(temporary, format="PNG")
    return path


def write_plots(rows: list[Row], folder: Path) -> list[Path]:
    """Every scatter plot of :data:`PLOTS` that has at least two models, as ``<y>_vs_<x>.png``."""
    written = []
    for x_name, y_name in PLOTS:
        name = f"{y_name.replace('/', '-')}_vs_{x_name.replace('/', '-')}.png"
        path = scatter(rows, x_name, y_name, folder / name)
        if path is not None:
            written.append(path)
    return written


def write_image_grid(images: dict[str, torch.Tensor], prompts: list[str], path: Path) -> Path:
    """A grid of one prompt type's images: a row per model, its images across (prompt ``k mod P``)."""
    count = next(iter(images.values())).shape[0]
    labels = [prompts[k % len(prompts)] for k in range(count)]
    return save_grid(list(images.values()), path, labels=labels, row_labels=[short_name(m, 9) for m in images])
