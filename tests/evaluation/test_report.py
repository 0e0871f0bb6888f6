"""The CSV (skipped metrics empty, never 0), the rank-scaled summary, scatter plots and short row labels."""

from __future__ import annotations

import csv
from pathlib import Path

from PIL import Image

from beyondlora.evaluation.report import rank_scale, short_name, write_csv, write_plots, write_summary
from beyondlora.evaluation.scoring import Row


def test_rank_scale() -> None:
    assert rank_scale([0.2, 0.9, 0.5], higher_better=True) == [0.0, 1.0, 0.5]
    assert rank_scale([0.2, 0.9, 0.5], higher_better=False) == [1.0, 0.0, 0.5]
    assert rank_scale([1.0, 1.0, 3.0], higher_better=True) == [0.25, 0.25, 1.0]
    assert rank_scale([4.0], higher_better=True) == [1.0]


def test_short_names_keep_the_end_of_a_sweeps_names() -> None:
    assert short_name("base", 9) == "base"
    assert short_name("lokr-step-000100-0123456789ab", 9) == "…p-000100"
    assert short_name("adapter-0123456789ab", 18) == "adapter"


def _rows() -> list[Row]:
    rows = []
    values = {"base": (0.1, 1.0, 0.0), "a-0123456789ab": (0.6, 0.8, 0.3), "b-0123456789ab": (0.4, 0.9, 0.1)}
    for model, (similarity, preservation, loss) in values.items():
        algorithm = {"base": "base", "a-0123456789ab": "lokr", "b-0123456789ab": "loha"}[model]
        rows += [
            Row(model, algorithm, "trigger", "image_similarity", "pixels", similarity),
            Row(model, algorithm, "style", "preservation", "pixels", preservation),
            Row(model, algorithm, "style", "style_loss", "pixels", loss),
            Row(model, algorithm, "trigger", "text_similarity", "clip", None, "skipped: needs --clip"),
        ]
    return rows


def test_csv_summary_and_plots(tmp_path: Path) -> None:
    rows = _rows()
    with open(write_csv(rows, tmp_path / "metrics.csv")) as handle:
        written = list(csv.DictReader(handle))
    skipped = [r for r in written if r["metric"] == "text_similarity"]
    assert len(skipped) == 3 and all(r["value"] == "" and r["note"] == "skipped: needs --clip" for r in skipped)
    path, means = write_summary(rows, tmp_path / "summary.csv")
    with open(path) as handle:
        summary = {r["model"]: r for r in csv.DictReader(handle)}
    # similarity: a best; preservation: base best; style loss (lower is better): base best
    assert summary["a-0123456789ab"]["trigger/image_similarity[pixels]"] == "1"
    assert (
        summary["base"]["style/style_loss[pixels]"] == "1"
        and summary["a-0123456789ab"]["style/style_loss[pixels]"] == "0"
    )
    assert means["b-0123456789ab"] == 0.5 and "trigger/text_similarity[clip]" not in summary["base"]
    plots = write_plots(rows, tmp_path / "plots")
    assert [p.name for p in plots] == ["style-preservation_vs_trigger-image_similarity.png"]
    assert Image.open(plots[0]).size == (560, 400)
