"""``beyondlora evaluate``: the base model and adapter files (or a sweep folder of them) judged on the same
prompts and seeds, by the LyCORIS paper's prompt types and metrics; writes ``metrics.csv`` (a row per model ×
prompt type × metric × features), ``summary.csv`` (rank-scaled per metric), scatter plots and image grids.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..integrations.diffusers import load_adapter, plan_adapter
from ..integrations.parts import find_parts
from ..tools.outputs import check_output
from ..training.models import load_base_model
from ..training.sampling import default_guidance
from .encoders import ClipEncoder, DinoEncoder, PixelEncoder
from .generation import ImageCache, file_key, settings_key
from .prompts import (
    DEFAULT_TEMPLATES,
    DEMO_TEMPLATES,
    DEMO_TRIGGER,
    PROMPT_TYPES,
    build_prompt_sets,
    default_plain,
    load_templates,
)
from .report import write_csv, write_image_grid, write_plots, write_summary
from .scoring import Row
from .session import BASE, Session, base_render, load_reference

DESCRIPTION = (
    "Judge adapters against their base model on the LyCORIS paper's prompt types (train, trigger, alter, style) "
    "and metrics (image and text similarity, centroid distance, Vendi diversity, Fréchet distance, KID, "
    "base-model preservation, CLIP image quality), every model on the same seeds. Learned features come from "
    "local CLIP / DINOv2 folders (--clip, --dino); without them the metrics that need them are skipped and "
    "named, and pixel features (and on the demo its concept score) are used. Images are cached: a rerun "
    "reuses them."
)


def expand_adapters(arguments: list[str]) -> list[Path]:
    """The adapter files: each argument a ``.safetensors`` file, a PEFT adapter folder, or a folder whose
    ``*.safetensors`` files (sorted by name) are a sweep of checkpoints."""
    paths: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if not path.exists():
            raise ValueError(f"--adapters: {path} does not exist")
        if path.is_dir() and not (path / "adapter_config.json").is_file():
            found = sorted(path.glob("*.safetensors"))
            if not found:
                raise ValueError(f"--adapters: folder {path} holds no .safetensors file and is no PEFT adapter folder")
            paths += found
        elif path.is_file() and path.suffix != ".safetensors":
            raise ValueError(f"--adapters: {path} is not a .safetensors file")
        else:
            paths.append(path)
    return list(dict.fromkeys(paths))


def algorithm_of(path: Path) -> str:
    """The adapter's algorithm(s) as its keys and metadata say (``lokr``; ``lokr+lora`` when mixed)."""
    from ..tools.adapter_files import load_adapter

    counts = Counter(adapter.algorithm for adapter in load_adapter(path).adapters.values())
    return "+".join(sorted(counts)) or "none"


@dataclass
class Result:
    """What :func:`evaluate` returns: every row, each model's mean rank-scaled score, the files written."""

    rows: list[Row]
    means: dict[str, float]
    files: list[Path]


def _training_images(data: str | None, is_demo: bool, side: int) -> tuple[list[str], torch.Tensor | None, str]:
    """(captions, training images or None, why there are none)."""
    from ..training.data import scan_dataset

    if data is None and is_demo:
        from ..demos.shapes import write_concept_dataset  # the images the default training run learns

        with tempfile.TemporaryDirectory() as folder:
            items = scan_dataset(write_concept_dataset(folder))
            return [i.caption for i in items], load_reference([i.path for i in items], side), ""
    if data is None:
        return [], None, "they compare with the training images: pass --data DIR (and train prompts need it too)"
    items = scan_dataset(data)
    if not items:
        raise ValueError(f"--data {data}: no captioned images found")
    return [i.caption for i in items], load_reference([i.path for i in items], side), ""


def evaluate(
    pretrained_model: str,
    adapters: list[str],
    trigger: str | None = None,
    plain: str | None = None,
    data: str | None = None,
    clip: str | None = None,
    dino: str | None = None,
    templates: str | None = None,
    prompt_types: tuple[str, ...] = PROMPT_TYPES,
    images: int = 8,
    steps: int = 20,
    guidance: float | None = None,
    resolution: int | None = None,
    batch_size: int | None = None,
    output_dir: str | Path = "evaluation",
    base_config: str | None = None,
    device: str = "cpu",
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> Result:
    """Evaluate the base model and every adapter (see the module docstring); ``images`` per prompt type."""
    for option, value in (("--images", images), ("--steps", steps), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    unknown = [t for t in prompt_types if t not in PROMPT_TYPES]
    if unknown or not prompt_types:
        raise ValueError(f"--prompt-types: unknown {', '.join(unknown)} (known: {', '.join(PROMPT_TYPES)})")
    paths = expand_adapters(adapters)
    output = Path(output_dir)
    inputs: list[tuple[Any, str]] = [(p, "an adapter") for p in paths]
    inputs += [(p, role) for p, role in ((data, "--data"), (templates, "--templates")) if p is not None]
    for name in ("metrics.csv", "summary.csv", "plots", "grids", "images"):
        check_output(output / name, inputs, overwrite)
    check_output(output, inputs, overwrite)
    algorithms = {p: algorithm_of(p) for p in paths}  # a bad file fails before any image is drawn
    # the demo base without --data: its built-in concept (the default training run's), prompts and measure
    is_demo = pretrained_model == "demo" and data is None
    chosen = dict(DEMO_TEMPLATES if is_demo else DEFAULT_TEMPLATES)
    if templates is not None:
        chosen.update(load_templates(templates))
    if trigger is None and not is_demo and set(prompt_types) - {"train"}:
        raise ValueError(
            "--trigger is required (the phrase that names the concept, e.g. 'sks dog') except for the demo's own "
            "concept (--pretrained-model demo without --data)"
        )
    trigger = trigger or DEMO_TRIGGER
    plain = plain or (trigger if is_demo and trigger == DEMO_TRIGGER else default_plain(trigger))
    encoders: list[Any] = [PixelEncoder()]
    if clip is not None:
        encoders.append(ClipEncoder(clip, torch.device(device)))
    if dino is not None:
        encoders.append(DinoEncoder(dino, torch.device(device)))
    base = load_base_model(pretrained_model, torch.device(device), base_config)
    for path in paths:  # an adapter for another model fails here, before any image is drawn
        plan_adapter(find_parts(base.pipe), path, strict=True)
    side = resolution or base.resolution
    captions, reference, reason = _training_images(data, is_demo, side)
    prompt_sets = build_prompt_sets(trigger, plain, captions, chosen, prompt_types)
    if "train" in prompt_types and "train" not in prompt_sets:
        echo("skipped: prompt type 'train' needs the training captions: pass --data DIR")
    guidance = default_guidance(base) if guidance is None else guidance
    settings = settings_key(model=pretrained_model, steps=steps, guidance=guidance, resolution=side)
    concept = None
    if is_demo:
        from ..demos.shapes import concept_score

        concept = concept_score
    session = Session(
        prompt_sets,
        images,
        ImageCache(output / "images", settings),
        batch_size or 4 * base.batch_size,
        encoders,
        reference,
        reason,
        concept,
    )
    render = base_render(base, base.text_encoders, side, steps, guidance)
    rows = session.score(BASE, "base", render)
    for path in paths:
        handle = load_adapter(base.pipe, path, adapter_name="evaluated", strict=True)
        try:
            rows += session.score(file_key(path), algorithms[path], render)
        finally:
            handle.remove()
    files = [write_csv(rows, output / "metrics.csv")]
    summary, means = write_summary(rows, output / "summary.csv")
    files.append(summary)
    files += write_plots(rows, output / "plots")
    for kind, prompts in prompt_sets.items():
        files.append(write_image_grid(session.images[kind], prompts.prompts, output / "grids" / f"{kind}.png"))
    for line in session.describe_encoders():
        echo(line)
    _print_table(rows, means, echo)
    echo(f"wrote {', '.join(str(f) for f in files[:2])}, {len(files) - 2} plot(s) and grid(s) in {output}")
    return Result(rows, means, files)


def _print_table(rows: list[Row], means: dict[str, float], echo: Callable[[str], None]) -> None:
    """Each model's mean rank-scaled score and its values of the headline metrics."""
    from .report import pick

    headline = ("trigger/concept_score", "trigger/image_similarity", "trigger/text_similarity", "style/preservation")
    shown = [h for h in headline if any(pick(rows, m, h) for m in means)]
    width = max(len(m) for m in means)
    echo(f"{'model':<{width}}  {'rank-scaled':>11}  " + "  ".join(f"{h:>24}" for h in shown))
    for model, mean in means.items():
        cells = []
        for name in shown:
            found = pick(rows, model, name)
            cells.append(f"{'n/a':>24}" if found is None else f"{found[0]:>15.4f} [{found[1]:>6}]")
        echo(f"{model:<{width}}  {mean:>11.3f}  " + "  ".join(cells))


def _evaluate(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    evaluate(
        args.pretrained_model,
        args.adapters,
        args.trigger,
        args.plain,
        args.data,
        args.clip,
        args.dino,
        args.templates,
        tuple(args.prompt_types),
        args.images,
        args.steps,
        args.guidance,
        args.resolution,
        args.batch_size,
        args.output_dir,
        args.base_config,
        args.device,
        args.overwrite,
    )
    return 0


def add_evaluate_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "evaluate",
        help="score adapters against their base model (fidelity, diversity, preservation…)",
        description=DESCRIPTION,
    )
    parser.add_argument("--pretrained-model", default="demo", help="the base model (default: demo)")
    parser.add_argument(
        "--adapters",
        nargs="+",
        required=True,
        metavar="ADAPTER",
        help="adapter files, PEFT folders, or folders of .safetensors checkpoints (a sweep)",
    )
    parser.add_argument("--trigger", help="the phrase naming the concept, e.g. 'sks dog' (demo: 'yellow cross')")
    parser.add_argument(
        "--plain", help="the trigger in plain words for CLIP (default: the trigger less its first word)"
    )
    parser.add_argument("--data", help="the training images and captions (as for train; demo: its concept images)")
    parser.add_argument("--clip", help="a local CLIP model folder (transformers CLIPModel with its tokenizer)")
    parser.add_argument("--dino", help="a local DINOv2 model folder (transformers Dinov2Model)")
    parser.add_argument("--templates", help="a TOML file of trigger / alter / style templates ('{}': the trigger)")
    parser.add_argument(
        "--prompt-types",
        nargs="+",
        default=list(PROMPT_TYPES),
        choices=PROMPT_TYPES,
        help="the prompt types to evaluate (default: all)",
    )
    parser.add_argument("--images", type=int, default=8, help="images per prompt type (default 8)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance (default 1.5 demo, else 7.5)")
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    parser.add_argument("--batch-size", type=int, help="images per generation batch (default: 4 × the model's)")
    parser.add_argument("--output-dir", default="evaluation", help="where results go (default: evaluation)")
    parser.add_argument("--base-config", help="configs for a single-file checkpoint (as for train)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, …")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--overwrite", action="store_true", help="allow outputs over an input path")
    parser.set_defaults(handler=_evaluate)
