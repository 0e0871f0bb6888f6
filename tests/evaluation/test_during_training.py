"""``beyondlora train --eval-every N``: the evaluation's metrics at every N-th step in metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from beyondlora.cli import main
from beyondlora.training.settings import TrainConfig, TrainConfigError
from beyondlora.training.trainer import train


def test_eval_every_logs_the_metrics_beside_the_loss(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = TrainConfig(
        output_dir=str(out),
        max_steps=4,
        eval_every=2,
        eval_images=2,
        sample_steps=2,
        sample_seeds=[0],
        save_every=0,
    )
    assert train(config, echo=lambda line: None) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = {r["step"]: r for r in records if any(k.startswith("eval/") for k in r)}
    assert sorted(evaluated) == [2, 4] and all("loss" in r for r in records)
    keys = set(evaluated[2])
    assert {"eval/trigger/concept_score[concept]", "eval/style/preservation[pixels]"} <= keys
    assert not any("[clip]" in k or "[dino]" in k for k in keys)  # skipped metrics are not logged as values
    assert 0.0 <= evaluated[4]["eval/trigger/concept_score[concept]"] <= 1.0
    # the images stay on disk beside the run: the base's once, the adapter's per evaluated step
    models = {p.name for p in (out / "evaluation" / "images").glob("*/*")}
    assert models == {"base", "step-000002", "step-000004"}


def test_eval_every_on_own_data_needs_the_trigger(tmp_path: Path, capsys) -> None:
    with pytest.raises(TrainConfigError, match="--eval-trigger"):
        TrainConfig(train_data_dir=str(tmp_path), eval_every=10).validate()
    assert main(["train", "--eval-every", "-1", "--output-dir", str(tmp_path / "run")]) == 2
    assert "--eval-every must not be negative" in capsys.readouterr().err
