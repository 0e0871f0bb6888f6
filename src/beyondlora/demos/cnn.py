"""The built-in demo: adapt a small convolutional classifier to a new domain with LoKr.

1. Build a small CNN from :class:`DemoConfig` and pre-train it on synthetic 12×12 pattern images
   (stripes, checkers, rings, diagonals).
2. Shift the domain (transposed images plus noise): the frozen base model gets worse.
3. Wrap it with a LoKr adapter on every conv and linear layer, train a few steps.
4. Save the adapter, reload it onto a fresh copy of the base, merge it, and check that all three give
   the same outputs.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LoKrConfig
from ..model import PeftModel, get_peft_model


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and schedule of the demo (defaults run in a few seconds on one CPU core)."""

    image_size: int = 12
    channels: int = 16
    hidden: int = 64
    classes: int = 4
    pretrain_steps: int = 150
    adapt_steps: int = 120
    batch_size: int = 64
    rank: int = 4
    seed: int = 0


class PatternNet(nn.Module):
    """conv 3×3 → conv 3×3 stride 2 → global pool → linear → linear."""

    def __init__(self, config: DemoConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, config.channels, 3, padding=1)
        self.conv2 = nn.Conv2d(config.channels, 2 * config.channels, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(2 * config.channels, config.hidden)
        self.fc2 = nn.Linear(config.hidden, config.classes)

    def forward(self, images: Tensor) -> Tensor:
        hidden = F.gelu(self.conv2(F.gelu(self.conv1(images))))
        return self.fc2(F.gelu(self.fc1(hidden.mean(dim=(2, 3)))))


def make_patterns(
    config: DemoConfig, count: int, generator: torch.Generator, shifted: bool = False
) -> tuple[Tensor, Tensor]:
    """``count`` images (N, 1, S, S) of four pattern classes with random phase and frequency, and labels.

    ``shifted`` transposes the images (horizontal stripes become vertical ones, so two classes trade
    looks) and adds noise: the new domain the adapter learns.
    """
    size = config.image_size
    labels = torch.randint(config.classes, (count,), generator=generator)
    grid = torch.arange(size, dtype=torch.float32)
    y, x = torch.meshgrid(grid, grid, indexing="ij")
    frequency = 0.5 + torch.rand(count, 1, 1, generator=generator)
    phase = 6.3 * torch.rand(count, 1, 1, generator=generator)
    waves = torch.stack(
        [
            torch.sin(frequency * y + phase),
            torch.sin(frequency * x + phase),
            torch.sin(frequency * x + phase) * torch.sin(frequency * y + phase),
            torch.sin(frequency * (x + y) / 1.4 + phase),
        ],
        dim=1,
    )
    images = waves[torch.arange(count), labels].unsqueeze(1)
    if shifted:
        images = images.transpose(2, 3) + 0.5 * torch.randn(images.shape, generator=generator)
    return images, labels


def train(model: nn.Module, config: DemoConfig, steps: int, shifted: bool, generator: torch.Generator) -> float:
    """AdamW on fresh batches; returns the last loss."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2 if shifted else 3e-3)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
        images, labels = make_patterns(config, config.batch_size, generator, shifted)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    model.eval()
    return float((model(images).argmax(-1) == labels).float().mean())


def run_demo(config: DemoConfig = DemoConfig(), output_dir: str | Path | None = None, echo=print) -> dict[str, float]:
    """Run the demo and return its figures (accuracies, parameter counts, max output differences)."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    started = time.perf_counter()

    base = PatternNet(config)
    train(base, config, config.pretrain_steps, shifted=False, generator=generator)
    test_images, test_labels = make_patterns(config, 1024, torch.Generator().manual_seed(config.seed + 1))
    shifted_images, shifted_labels = make_patterns(config, 1024, torch.Generator().manual_seed(config.seed + 2), True)
    figures = {
        "base_accuracy_original_domain": accuracy(base, test_images, test_labels),
        "base_accuracy_new_domain": accuracy(base, shifted_images, shifted_labels),
    }
    echo(
        f"pre-trained base: accuracy {figures['base_accuracy_original_domain']:.1%} on its own patterns, "
        f"{figures['base_accuracy_new_domain']:.1%} on the shifted domain"
    )

    pristine = copy.deepcopy(base)
    lokr = LoKrConfig(r=config.rank, alpha=config.rank, target_modules=["conv1", "conv2", "fc1", "fc2"])
    model = get_peft_model(base, lokr)
    trainable, total = model.get_nb_trainable_parameters()
    figures.update(trainable_parameters=trainable, all_parameters=total)
    echo(
        f"LoKr adapter (r={config.rank}): trainable {trainable:,} of {total:,} parameters "
        f"({100 * trainable / total:.1f}%)"
    )

    loss = train(model, config, config.adapt_steps, shifted=True, generator=generator)
    figures["adapted_accuracy_new_domain"] = accuracy(model, shifted_images, shifted_labels)
    echo(
        f"after {config.adapt_steps} LoKr steps: loss {loss:.3f}, "
        f"accuracy on the shifted domain {figures['adapted_accuracy_new_domain']:.1%}"
    )

    with torch.no_grad():
        adapted = model(shifted_images)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(output_dir) if output_dir is not None else Path(scratch) / "adapter"
        model.save_pretrained(folder)
        reloaded = PeftModel.from_pretrained(copy.deepcopy(pristine), folder).eval()
        with torch.no_grad():
            figures["reload_max_abs_diff"] = float((reloaded(shifted_images) - adapted).abs().max())
        merged = reloaded.merge_and_unload()
        with torch.no_grad():
            figures["merged_max_abs_diff"] = float((merged(shifted_images) - adapted).abs().max())
        echo(
            f"saved to {folder}; reloaded onto a fresh base: max |Δ output| {figures['reload_max_abs_diff']:.2e}; "
            f"merged into plain torch layers: max |Δ output| {figures['merged_max_abs_diff']:.2e}"
        )
    figures["seconds"] = time.perf_counter() - started
    echo(f"done in {figures['seconds']:.1f} s")
    return figures
