"""``beyondlora train``: fine-tune a Stable Diffusion UNet (and optionally its text encoder) with any
adapter algorithm, from one CPU to several processes under ``torchrun`` / ``accelerate launch`` (the
processes, devices, mixed precision and DDP are accelerate's: :mod:`.distributed`).

Every random draw is a function of (seed, step) or restored from a checkpoint, so a run of N steps and a
run stopped at any checkpoint and resumed produce the same adapter.  Only the main process writes files.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..host.inject import adapter_layers
from ..model import get_peft_model
from .data import (
    BucketDataset,
    LatentCache,
    UnreadableImageWarning,
    batch_generator,
    load_pixels,
    process_caption,
    scan_dataset,
)
from .distributed import Engine
from .models import BUILT_IN, check_model_path, load_base_model
from .network import TRAIN_OPTIONS, adapter_config
from .optimization import lr_factor, make_optimizer
from .outputs import finish_run, prepare_output_dir, sample_grid, write_config
from .resume import MetricsLog, checkpoint_dirs, load_checkpoint, save_checkpoint
from .settings import TrainConfig, TrainConfigError
from .signals import StopSignals
from .storage import COMPUTE

INTERRUPTED = 130
#: fp16 steps skipped in a row (gradients infinite at every loss scale tried) before the run stops; the
#: scale halves on each, so 30 take it from the default 65536 below 1e-4
MAX_SKIPPED_STEPS = 30


class NonFiniteLossError(ValueError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


class Trainer:
    """One training run; :meth:`run` returns the process exit status (0 done, 130 interrupted)."""

    def __init__(self, config: TrainConfig, echo: Callable[[str], None] = print) -> None:
        self.config, self.echo = config, echo
        config.validate()
        self.dist = Engine(config.mixed_precision)
        config.mixed_precision = self.dist.mixed_precision  # the effective configuration records it
        try:
            self._check()
        except BaseException:
            self.dist.close()
            raise

    def _check(self) -> None:
        """Every check that needs no model; creates the output folder."""
        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.set_flush_denormal(True)
        check_model_path(config.pretrained_model, config.base_config)
        compute = COMPUTE[config.base_precision]
        if config.base_precision != "fp32" and config.mixed_precision != compute:
            raise TrainConfigError(
                f"--base-precision {config.base_precision} computes the base in {compute}: "
                f"add --mixed-precision {compute}"
            )
        if config.train_data_dir is None and config.pretrained_model != "demo":
            raise TrainConfigError("--train-data-dir is required unless --pretrained-model is 'demo'")
        self.items = None if config.train_data_dir is None else self._scan(config.train_data_dir)
        if config.resume and not checkpoint_dirs(Path(config.output_dir or "")):
            raise TrainConfigError(f"--resume: no checkpoint in {Path(config.output_dir or '') / 'checkpoints'}")
        if config.output_dir and not config.resume and checkpoint_dirs(Path(config.output_dir)):
            raise TrainConfigError(
                f"{config.output_dir} already has checkpoints: pass --resume to continue that "
                "run or choose another --output-dir"
            )
        self.output_dir = prepare_output_dir(config, self.dist)

    # --- setup ---------------------------------------------------------------------------------
    def _scan(self, folder: str) -> list[Any]:
        """The data folder's items, read once (every data error before the model loads); each unreadable
        image is reported as one plain line (on the main process), not as a Python warning."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            items = scan_dataset(folder)
        for warning in caught:
            if issubclass(warning.category, UnreadableImageWarning):
                if self.dist.is_main:
                    self.echo(f"warning: {warning.message}")
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        return items

    def _report_unused_options(self) -> None:
        """Say, once per kind, when an option the run chose has no effect on some of the adapted layers (a
        default that does not act on a small model, e.g. the demo's, is not the user's to fix)."""
        unused: dict[str, int] = {}
        for model in self.adapted:
            for _, layer in adapter_layers(model):
                for adapter in layer.adapters.values():
                    for option, note in adapter.unused_options().items():
                        chosen_by = TRAIN_OPTIONS.get(option)
                        if chosen_by is None or any(self.config.was_set(o) for o in chosen_by):
                            unused[note] = unused.get(note, 0) + 1
        for note, count in unused.items():
            self.echo(f"note: {note} ({count} layer(s))")

    def _setup(self) -> None:
        config = self.config
        data_dir = config.train_data_dir
        #: the run learns the demo's concept (yellow crosses): its samples and score are the demo's
        self.demo_concept = data_dir is None
        if data_dir is None:
            from ..demos.shapes import write_concept_dataset  # lazy: pulls in numpy

            data_dir = str(self.output_dir / "concept_data")
            if self.dist.is_main:
                write_concept_dataset(data_dir)
            self.dist.barrier()
        items = self.items if self.items is not None else scan_dataset(data_dir)
        self.base = load_base_model(
            config.pretrained_model, self.dist.device, config.base_config, config.base_precision
        )
        config.fill_model_defaults(self.base.is_demo, self.base.batch_size, self.base.resolution)
        if self.dist.is_main:
            write_config(config, self.output_dir)
        resolution = config.resolution
        step = 8 * self.base.scale_factor
        if resolution % step:
            raise TrainConfigError(f"--resolution must be a multiple of {step} for this model, got {resolution}")
        self.base.objective.set_noise_options(config.prediction_type, config.min_snr_gamma)
        self.dataset = BucketDataset(items, resolution, step, config.enable_bucket)
        torch.manual_seed(config.seed)
        denoiser = self.base.denoiser
        denoiser_config = adapter_config(config, "unet", denoiser)
        if denoiser_config is None:
            raise TrainConfigError(
                f"--preset {config.preset} adapts no layer of this model's {type(denoiser).__name__}"
            )
        self.denoiser = get_peft_model(denoiser, denoiser_config)
        self.text_encoders = list(self.base.text_encoders)  # the wrapped ones when they train
        self.adapted = [self.denoiser]
        if config.train_text_encoder and self.base.objective.denoiser != "unet":
            raise TrainConfigError(
                "--train-text-encoder: beyondlora train adapts the text encoders of SD 1.x/2.x/SDXL only; SD3 and "
                "Flux train their transformer (the text embeddings are computed once per caption and kept)"
            )
        if config.train_text_encoder:
            for number, text_encoder in enumerate(self.text_encoders):
                text_config = adapter_config(config, "text_encoder", text_encoder)
                if text_config is None:  # the text path embeds through every encoder, adapted or not
                    raise TrainConfigError(
                        f"--preset {config.preset} adapts no layer of text encoder {number + 1}: drop "
                        "--train-text-encoder or choose a preset that targets it"
                    )
                self.text_encoders[number] = get_peft_model(text_encoder, text_config).train()
                self.adapted.append(self.text_encoders[number])
        self.denoiser.train()
        self._report_unused_options()
        # what the training forward calls (DDP wrappers with several processes); sampling calls the models
        self.trained_models = [
            # SDXL's first text encoder feeds its penultimate layer on: its last layer gets no gradient
            self.dist.prepare_model(model, find_unused_parameters=self.base.is_xl and number == 1)
            for number, model in enumerate(self.adapted)
        ]
        if self.dist.world > 1 and self.dist.is_main:
            self.echo(f"data-parallel over {self.dist.world} processes ({self.dist.describe()})")
        if config.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        prefix = f"{self.base.objective.denoiser}."  # checkpoints name the parameters by part
        self.trainable = {prefix + n: p for n, p in denoiser.named_parameters() if p.requires_grad}
        if config.train_text_encoder:
            for number, text_encoder in enumerate(self.base.text_encoders):
                prefix = "te." if number == 0 else f"te{number + 1}."
                self.trainable.update({prefix + n: p for n, p in text_encoder.named_parameters() if p.requires_grad})
        if not self.trainable:
            raise TrainConfigError("the chosen --algo and --preset adapt no layer of this model")
        optimizer = make_optimizer(config, list(self.trainable.values()))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config))
        self.optimizer = self.dist.prepare_optimizer(optimizer)
        self.cache = None
        if config.cache_latents:
            disk = self.output_dir / "latent_cache.safetensors" if config.cache_latents_to_disk else None
            self.cache = LatentCache(
                self.dataset,
                self.base.encode,
                config.random_flip,
                disk if self.dist.is_main else None,
                model=str(Path(config.pretrained_model).resolve())
                if config.pretrained_model not in BUILT_IN
                else config.pretrained_model,
            )
        self.evaluation = None
        if config.eval_every and self.dist.is_main:
            from ..evaluation.during_training import CheckpointEvaluation  # lazy: evaluation imports training

            self.evaluation = CheckpointEvaluation(self)
        self.embeddings: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.global_batch = config.batch_size * self.dist.world
        self.batches_per_epoch = len(self.dataset.epoch_batches(config.seed, 0, self.global_batch))

    # --- one step ------------------------------------------------------------------------------
    def _text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states, pooled or None) of the captions; memoised per caption when the encoders are frozen."""
        objective = self.base.objective
        if self.config.train_text_encoder:
            return objective.embed(self.base, self.trained_models[1:], captions)
        missing = [c for c in dict.fromkeys(captions) if c not in self.embeddings]
        if missing:
            with torch.no_grad():
                states, pooled = objective.embed(self.base, self.text_encoders, missing)
            for number, caption in enumerate(missing):
                self.embeddings[caption] = (states[number], None if pooled is None else pooled[number])
        states = torch.stack([self.embeddings[c][0] for c in captions])
        pooled = [self.embeddings[c][1] for c in captions]
        return states, None if pooled[0] is None else torch.stack(pooled)

    def _batch(self, position: int) -> tuple[torch.Tensor, list[str]]:
        config = self.config
        epoch, index = divmod(position, self.batches_per_epoch)
        members = self.dataset.epoch_batches(config.seed, epoch, self.global_batch)[index]
        generator = batch_generator(config.seed, epoch, index)
        flips = (torch.rand(len(members), generator=generator) < 0.5).tolist()
        crops = torch.rand(len(members), 2, generator=generator).tolist()
        captions = [
            process_caption(
                self.dataset.items[m].caption,
                config.shuffle_caption,
                config.keep_tokens,
                config.caption_dropout,
                generator,
            )
            for m in members
        ]
        mine = range(self.dist.rank * config.batch_size, (self.dist.rank + 1) * config.batch_size)
        latents = []
        for i in mine:
            flip = config.random_flip and flips[i]
            if self.cache is not None:
                latents.append(self.cache.get(members[i], flip))
                continue
            crop = tuple(crops[i]) if config.random_crop else (0.5, 0.5)
            pixels = load_pixels(self.dataset.items[members[i]], self.dataset.bucket_of[members[i]], crop)
            latents.append(self.base.encode((pixels.flip(-1) if flip else pixels)[None])[0].float())
        return torch.stack(latents).to(self.dist.device), [captions[i] for i in mine]

    def _noise(self, step: int, micro: int, shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and times (the objective's), drawn per sample from (seed, step, micro-batch, global sample
        index): the same for a batch of 2B in one process as for B in each of two."""
        config, noises, timesteps = self.config, [], []
        for i in range(shape[0]):
            index = self.dist.rank * shape[0] + i
            generator = torch.Generator().manual_seed(((config.seed * 1_000_003 + step) * 97 + micro) * 4099 + index)
            noise = torch.randn(shape[1:], generator=generator)
            if config.noise_offset:
                noise = noise + config.noise_offset * torch.randn((shape[1], 1, 1), generator=generator)
            noises.append(noise)
            timesteps.append(self.base.objective.draw_time(generator))
        return torch.stack(noises), torch.stack(timesteps)

    def _loss(self, step: int, micro: int, latents: torch.Tensor, captions: list[str]) -> torch.Tensor:
        noise, times = self._noise(step, micro, latents.shape)
        noise, times = noise.to(latents.device), times.to(latents.device)
        with self.dist.autocast():
            text = self._text(captions)
            return self.base.objective.losses(self.trained_models[0], latents, noise, times, text).mean()

    def _save(self, step: int) -> None:
        if self.dist.is_main:
            save_checkpoint(
                self.output_dir,
                step,
                self.trainable,
                self.optimizer,
                self.scheduler,
                step * self.config.gradient_accumulation,
                self.config.keep_checkpoints,
                self.dist.scaler,
                time.perf_counter() - self._started,
            )
        self.dist.barrier()

    # --- the run -------------------------------------------------------------------------------
    def run(self) -> int:
        from tqdm.auto import tqdm

        config = self.config
        self._started = started = time.perf_counter()
        self._setup()
        start = 0
        if config.resume:
            start, _, earlier = load_checkpoint(
                self.output_dir, self.trainable, self.optimizer, self.scheduler, self.dist.scaler
            )
            # the clock goes on from the checkpoint: times in metrics.jsonl and the summary cover the whole run
            self._started = started = started - earlier
            if self.dist.is_main:
                self.echo(f"resuming {self.output_dir} from step {start}")
        metrics = MetricsLog(self.output_dir / "metrics.jsonl", start) if self.dist.is_main else None
        writer = self._tensorboard()
        bar = tqdm(total=config.max_steps, initial=start, disable=not self.dist.is_main, desc="training")
        params = list(self.trainable.values())
        skipped_in_a_row = 0
        with StopSignals() as stop:
            for step in range(start, config.max_steps):
                total = 0.0
                for micro in range(config.gradient_accumulation):
                    latents, captions = self._batch(step * config.gradient_accumulation + micro)
                    # the gradients are averaged over processes once, in the last micro-batch's backward
                    with self.dist.no_sync(self.trained_models, skip=micro < config.gradient_accumulation - 1):
                        loss = self._loss(step, micro, latents, captions) / config.gradient_accumulation
                        self.dist.backward(loss)
                    total += loss.item()
                total = self.dist.mean(total)
                if not math.isfinite(total):
                    bar.close()
                    kept = checkpoint_dirs(self.output_dir)
                    raise NonFiniteLossError(
                        f"the loss became {total} at step {step + 1}; stopped. The last good "
                        f"checkpoint is {kept[-1] if kept else 'none (none was saved yet)'}"
                    )
                if config.max_grad_norm:
                    self.dist.clip_grad_norm_(params, config.max_grad_norm)
                lr = self.scheduler.get_last_lr()[0]
                self.optimizer.step()  # accelerate's wrapper: unscales and skips inf/NaN steps under fp16
                skipped = self.optimizer.step_was_skipped
                skipped_in_a_row = skipped_in_a_row + 1 if skipped else 0
                if not skipped:  # the schedule follows the updates actually made
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                done = step + 1
                evaluated = {}
                if self.evaluation is not None and done % config.eval_every == 0:
                    evaluated = self.evaluation(done)
                if metrics is not None:
                    record = {
                        "step": done,
                        "loss": total,
                        "lr": lr,
                        "epoch": step // max(1, self.batches_per_epoch),
                        "time": round(time.perf_counter() - started, 3),
                    }
                    metrics.write(record | ({"skipped": True} if skipped else {}) | evaluated)
                if skipped_in_a_row == MAX_SKIPPED_STEPS:
                    bar.close()
                    raise NonFiniteLossError(
                        f"fp16: the last {MAX_SKIPPED_STEPS} steps had infinite or NaN gradients and were skipped "
                        f"(loss scale now {self.dist.scaler.get_scale():.3g}); stopped at step {done}. Try "
                        "--mixed-precision bf16 or a lower --learning-rate"
                    )
                if writer is not None:
                    writer.add_scalar("loss", total, done)
                    writer.add_scalar("lr", lr, done)
                    for key, value in evaluated.items():
                        writer.add_scalar(key, value, done)
                bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
                if config.save_every and done % config.save_every == 0 and done < config.max_steps:
                    self._save(done)
                if config.sample_every and done % config.sample_every == 0 and self.dist.is_main:
                    sample_grid(self, self.output_dir / "samples" / f"step-{done:06d}.png")
                if self.dist.any(stop.signal is not None):
                    self._save(done)
                    bar.close()
                    if self.dist.is_main:
                        self.echo(f"interrupted at step {done}: checkpoint saved; rerun with --resume to continue")
                    return INTERRUPTED
            bar.close()
            self._save(config.max_steps)
        if self.dist.is_main:
            finish_run(self, metrics, time.perf_counter() - started)
        if writer is not None:
            writer.close()
        self.dist.barrier()
        return 0

    def _tensorboard(self) -> Any:
        if not self.dist.is_main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.output_dir / "tensorboard"))


def train(config: TrainConfig, echo: Callable[[str], None] = print) -> int:
    """Run ``config``; returns the exit status (0, or 130 when interrupted after saving a checkpoint)."""
    trainer = Trainer(config, echo)
    try:
        return trainer.run()
    finally:
        trainer.dist.close()


def default_output_dir() -> Path:
    return Path("output") / time.strftime("%Y%m%d-%H%M%S")
