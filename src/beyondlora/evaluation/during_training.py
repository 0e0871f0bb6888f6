"""``beyondlora train --eval-every N``: the evaluation of ``beyondlora evaluate``, run on the adapter being
trained at every N-th step, its values logged beside the loss (``metrics.jsonl``, TensorBoard) under keys
``eval/<prompt type>/<metric>[<features>]``.  The base model's images are drawn once, with the adapters off;
every image is kept under ``<output>/evaluation/images`` like the command's cache."""

from __future__ import annotations

import contextlib
from typing import Any

from ..training.sampling import default_guidance
from .encoders import ClipEncoder, DinoEncoder, PixelEncoder
from .generation import ImageCache, settings_key
from .prompts import DEFAULT_TEMPLATES, DEMO_TEMPLATES, DEMO_TRIGGER, build_prompt_sets, default_plain
from .session import BASE, Session, base_render, load_reference


class CheckpointEvaluation:
    """Built once the trainer has its models (so a bad encoder folder fails before training); calling it with
    a step scores the adapter as it is then and returns ``{key: value}`` for every metric that has a value."""

    def __init__(self, trainer: Any) -> None:
        config, base = trainer.config, trainer.base
        self.trainer = trainer
        demo = trainer.demo_concept
        trigger = config.eval_trigger or DEMO_TRIGGER
        plain = trigger if demo and trigger == DEMO_TRIGGER else default_plain(trigger)
        items = trainer.dataset.items
        prompt_sets = build_prompt_sets(
            trigger, plain, [i.caption for i in items], DEMO_TEMPLATES if demo else DEFAULT_TEMPLATES
        )
        encoders: list[Any] = [PixelEncoder()]
        if config.eval_clip:
            encoders.append(ClipEncoder(config.eval_clip, trainer.dist.device))
        if config.eval_dino:
            encoders.append(DinoEncoder(config.eval_dino, trainer.dist.device))
        guidance = default_guidance(base) if config.guidance_scale is None else config.guidance_scale
        side = config.resolution
        settings = settings_key(
            model=config.pretrained_model, steps=config.sample_steps, guidance=guidance, resolution=side
        )
        concept = None
        if base.is_demo and demo:
            from ..demos.shapes import concept_score

            concept = concept_score
        self.session = Session(
            prompt_sets,
            config.eval_images,
            ImageCache(trainer.output_dir / "evaluation" / "images", settings),
            4 * base.batch_size,
            encoders,
            load_reference([i.path for i in items], side),
            concept=concept,
        )
        self.render = base_render(base, trainer.text_encoders, side, config.sample_steps, guidance)

    def __call__(self, step: int) -> dict[str, float]:
        """The metrics of the adapter at ``step`` (the base model's first, on the first call)."""
        if not self.session.base_features:
            with contextlib.ExitStack() as stack:
                for model in self.trainer.adapted:
                    stack.enter_context(model.disable_adapter())
                self.session.score(BASE, "base", self.render)
        rows = self.session.score(f"step-{step:06d}", self.trainer.config.algo, self.render)
        return {f"eval/{row.key}": row.value for row in rows if row.value is not None}
