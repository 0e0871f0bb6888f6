"""``beyondlora evaluate`` on the built-in demo, with no learned encoder: one command over a sweep folder (an
adapter trained on the demo concept, a random one) judged against the base model on the same seeds.

The fixture trains 80 steps instead of the default job's 200 to save a minute; the default job's adapter
behaves the same under this command (measured 2026-12-06: trigger concept score 0.698 against the base's
0.000, style preservation 0.798 against 1; this one 0.631 and 0.807)."""

from __future__ import annotations

import contextlib
import csv
import io
import shutil
import time
from pathlib import Path

import pytest

from beyondlora.cli import main
from beyondlora.training.settings import TrainConfig
from beyondlora.training.trainer import train


def _rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def _value(rows: list[dict[str, str]], model: str, kind: str, metric: str, features: str) -> float:
    (row,) = [
        r
        for r in rows
        if r["model"].startswith(model) and (r["prompt_type"], r["metric"], r["features"]) == (kind, metric, features)
    ]
    return float(row["value"])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory, random_adapter: Path) -> tuple[Path, str, float]:
    root = tmp_path_factory.mktemp("evaluate")
    run = root / "run"
    config = TrainConfig(output_dir=str(run), max_steps=80, save_every=0, sample_seeds=[0], sample_steps=2)
    assert train(config, echo=lambda line: None) == 0
    sweep = root / "sweep"
    sweep.mkdir()
    shutil.copy(run / "adapter.safetensors", sweep / "trained.safetensors")
    shutil.copy(random_adapter, sweep / "random.safetensors")
    printed = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        assert main(["evaluate", "--adapters", str(sweep), "--output-dir", str(root / "out")]) == 0
    return root / "out", printed.getvalue(), time.perf_counter() - started


def test_trained_adapter_beats_the_base_on_the_trigger_and_bleeds_on_held_out_prompts(evaluated) -> None:
    out, printed, seconds = evaluated
    rows = _rows(out)
    assert {r["model"].split("-")[0] for r in rows} == {"base", "trained", "random"}
    assert {r["algorithm"] for r in rows} == {"base", "lokr"}
    base_score = _value(rows, "base", "trigger", "concept_score", "concept")
    trained_score = _value(rows, "trained", "trigger", "concept_score", "concept")
    assert trained_score > base_score + 0.3, (trained_score, base_score)
    assert _value(rows, "trained", "trigger", "image_similarity", "pixels") > _value(
        rows, "base", "trigger", "image_similarity", "pixels"
    )
    # held-out prompts of the base vocabulary ("a red circle", …): the adapter changes what the base drew
    assert _value(rows, "base", "style", "preservation", "pixels") == pytest.approx(1.0)
    assert _value(rows, "trained", "style", "preservation", "pixels") < 0.95
    assert _value(rows, "trained", "style", "style_loss", "pixels") > _value(
        rows, "base", "style", "style_loss", "pixels"
    )
    assert "trigger/concept_score" in printed and seconds < 180, seconds


def test_missing_encoders_are_named_never_zero(evaluated) -> None:
    out, printed, _ = evaluated
    rows = _rows(out)
    skipped = [r for r in rows if r["value"] == ""]
    assert {r["features"] for r in skipped} == {"clip", "dino"}
    assert all(r["note"].startswith("skipped: needs --clip") for r in skipped if r["features"] == "clip")
    assert all(r["note"].startswith("skipped: needs --dino") for r in skipped if r["features"] == "dino")
    assert {r["metric"] for r in skipped if r["features"] == "clip"} >= {"text_similarity", "quality", "vendi"}
    assert "text_similarity and quality need --clip" in printed and "need --dino" in printed
    assert "features 'pixels': RGB values" in printed  # the offline default says what it is


def test_outputs_and_a_rerun_reuses_every_image(evaluated, monkeypatch: pytest.MonkeyPatch) -> None:
    out, _, _ = evaluated
    summary = (out / "summary.csv").read_text().splitlines()
    assert summary[0].startswith("model,algorithm,mean_rank_scaled,") and len(summary) == 4
    assert {p.name for p in (out / "grids").iterdir()} == {"train.png", "trigger.png", "alter.png", "style.png"}
    assert (out / "plots" / "style-preservation_vs_trigger-concept_score.png").is_file()
    assert len(list((out / "images").rglob("*.png"))) == 3 * 4 * 8  # models × prompt types × images
    before = (out / "metrics.csv").read_text()

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("an image was generated again")

    monkeypatch.setattr("beyondlora.evaluation.session.generate", fail)
    sweep = out.parent / "sweep"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["evaluate", "--adapters", str(sweep), "--output-dir", str(out)]) == 0
    assert (out / "metrics.csv").read_text() == before
