"""What a run writes besides checkpoints: the effective configuration, samples, the before/after grid,
the loss curve, the adapter file and the closing summary."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import FusedLayerError
from ..formats.atomic import atomic_path
from ..integrations.diffusers import save_adapter
from .report import save_grid, save_loss_curve, save_sample_grid
from .sampling import generate
from .settings import TrainConfig, TrainConfigError

#: seeds of the demo's concept measure (more than the grid shows, for a steadier number)
SCORE_SEEDS = list(range(8))


def prepare_output_dir(config: TrainConfig, dist: Any) -> Path:
    """Create the output folder (default ``output/<timestamp>``, agreed by all processes) and write the
    effective configuration into it as ``config.toml`` and ``config.json``."""
    name = config.output_dir or str(Path("output") / time.strftime("%Y%m%d-%H%M%S"))
    output_dir = Path(dist.broadcast_text(name))
    config.output_dir = str(output_dir)
    if dist.is_main:
        if output_dir.exists() and not output_dir.is_dir():
            raise TrainConfigError(f"--output-dir {output_dir} is a file")
        output_dir.mkdir(parents=True, exist_ok=True)
        write_config(config, output_dir)
    dist.barrier()
    return output_dir


def write_config(config: TrainConfig, output_dir: Path) -> None:
    """The effective configuration as ``config.toml`` (which reruns the run) and ``config.json``; written
    again once the base model has settled its defaults (:meth:`.TrainConfig.fill_model_defaults`)."""
    with atomic_path(output_dir / "config.toml") as path:
        path.write_text(config.to_toml())
    with atomic_path(output_dir / "config.json") as path:
        path.write_text(json.dumps(config.to_dict(), indent=2))


def sample_prompts(trainer: Any) -> list[str]:
    """``--sample-prompts``, else the demo concept's prompts when the run learns it, else the run's first
    three distinct captions."""
    if trainer.config.sample_prompts:
        return trainer.config.sample_prompts
    if trainer.demo_concept:
        from ..demos.shapes import CONCEPT_PROMPT  # lazy: pulls in numpy

        return [CONCEPT_PROMPT, "a red circle", "a blue square"]
    captions = list(dict.fromkeys(item.caption for item in trainer.dataset.items))
    return captions[:3]


def _images(trainer: Any, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """One image per (seed, prompt), seed-major: (len(seeds) · len(prompts), 3, H, W)."""
    base, config = trainer.base, trainer.config
    side = config.resolution or base.resolution
    return generate(base, trainer.text_encoders, prompts, seeds, side, config.sample_steps, config.guidance_scale)


def sample_grid(trainer: Any, path: Path | None = None) -> torch.Tensor:
    """Samples of the sample prompts (columns) for the sample seeds (rows); written to ``path`` if given."""
    prompts, seeds = sample_prompts(trainer), trainer.config.sample_seeds
    images = _images(trainer, prompts, seeds)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_sample_grid(images, prompts, seeds, path)
    return images


def _before(trainer: Any) -> torch.Tensor:
    with _adapters_off(trainer):
        return sample_grid(trainer)


class _adapters_off:  # noqa: N801 - used like a function
    def __init__(self, trainer: Any) -> None:
        self.contexts = [m.disable_adapter() for m in trainer.adapted]

    def __enter__(self) -> None:
        for context in self.contexts:
            context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for context in reversed(self.contexts):
            context.__exit__(*exc)


def finish_run(trainer: Any, metrics: Any, seconds: float) -> dict[str, Any]:
    """Write the adapter, the before/after grid and the loss curve; print and return the summary."""
    config, output_dir = trainer.config, trainer.output_dir
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.save_precision]
    adapter_path = output_dir / "adapter.safetensors"
    metadata = {"beyondlora_training": json.dumps(config.to_dict()), "ss_steps": str(config.max_steps)}
    try:
        save_adapter(
            trainer.base.pipe, adapter_path, dtype=dtype, metadata=metadata, as_difference=config.save_as_difference
        )
    except FusedLayerError as error:  # e.g. LoKr on Flux's q, k, v: kohya's names fuse them into one module
        trainer.echo(f"note: {error}; written with LyCORIS' names (diffusers paths, each layer its own module)")
        save_adapter(
            trainer.base.pipe,
            adapter_path,
            dtype=dtype,
            metadata=metadata,
            as_difference=config.save_as_difference,
            names="lycoris",
        )
    prompts, seeds = sample_prompts(trainer), config.sample_seeds
    after = sample_grid(trainer)
    before = _before(trainer)
    rows = list(before.split(len(prompts))) + list(after.split(len(prompts)))
    labels = [f"before {s}" for s in seeds] + [f"after {s}" for s in seeds]
    save_grid(rows, output_dir / "before_after.png", labels=prompts, row_labels=labels)
    save_loss_curve(metrics.steps, metrics.losses, output_dir / "loss_curve.png")
    summary: dict[str, Any] = {
        "steps": config.max_steps,
        "seconds": round(seconds, 1),
        "adapter": str(adapter_path),
        "final_loss": metrics.losses[-1] if metrics.losses else None,
        "sample_prompts": prompts,
    }
    lines = [
        f"trained {config.algo} for {config.max_steps} steps ({seconds:.0f} s of training); outputs in {output_dir}"
    ]
    if trainer.demo_concept:
        summary.update(demo_scores(trainer))
        lines.append(
            f"  concept score of '{summary['prompt']}' samples (IoU of yellow pixels with a cross, 0..1, "
            f"{len(SCORE_SEEDS)} seeds): before {summary['score_before']:.3f}, after {summary['score_after']:.3f} "
            f"({summary['score_after'] - summary['score_before']:+.3f})"
        )
    names = {"summary.json"} | {p.name + ("/" if p.is_dir() else "") for p in output_dir.iterdir()}
    summary["files"] = sorted(n for n in names if not n.startswith("."))  # every file and folder of the run
    with atomic_path(output_dir / "summary.json") as path:
        path.write_text(json.dumps(summary, indent=2))
    lines.insert(1, "  wrote " + ", ".join(summary["files"]))
    trainer.echo("\n".join(lines))
    return summary


def demo_scores(trainer: Any) -> dict[str, Any]:
    """The demo's concept measure on the concept prompt's samples before and after training."""
    from ..demos.shapes import CONCEPT_PROMPT, concept_score  # lazy: pulls in numpy

    after = _images(trainer, [CONCEPT_PROMPT], SCORE_SEEDS)
    with _adapters_off(trainer):
        before = _images(trainer, [CONCEPT_PROMPT], SCORE_SEEDS)
    return {
        "prompt": CONCEPT_PROMPT,
        "score_before": concept_score(before).mean().item(),
        "score_after": concept_score(after).mean().item(),
    }
