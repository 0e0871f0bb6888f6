"""Prompt sets by type, template files, the image cache (keys, seeds, resumption) and the command's input
checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from beyondlora.cli import main
from beyondlora.evaluation.command import expand_adapters
from beyondlora.evaluation.generation import ImageCache, file_key
from beyondlora.evaluation.prompts import DEFAULT_TEMPLATES, build_prompt_sets, default_plain, load_templates


def test_prompt_sets_fill_the_trigger_and_its_plain_words() -> None:
    captions = ["a photo of sks dog", "sks dog on grass", "a photo of sks dog"]
    sets = build_prompt_sets("sks dog", default_plain("sks dog"), captions, DEFAULT_TEMPLATES)
    assert list(sets) == ["train", "trigger", "alter", "style"]
    assert sets["train"].prompts == ["a photo of sks dog", "sks dog on grass"]
    assert sets["train"].plain == ["a photo of dog", "dog on grass"]
    assert sets["trigger"].prompts == ["sks dog"] and sets["trigger"].plain == ["dog"]
    assert sets["alter"].prompts[0] == "sks dog in a chef's outfit, cooking in a kitchen"
    assert sets["style"].plain[0] == "dog in the style of watercolor painting"
    assert [sets["style"].prompt_of(k) for k in range(8)] == [0, 1, 2, 3, 4, 5, 0, 1]
    assert "train" not in build_prompt_sets("sks dog", "dog", [], DEFAULT_TEMPLATES)
    assert default_plain("zwx") == "zwx"


def test_template_files(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('alter = ["{} at the beach", "a drawing of {}"]\n')
    assert load_templates(good) == {"alter": ["{} at the beach", "a drawing of {}"]}
    bad = {"unknown.toml": 'colour = ["{}"]\n', "empty.toml": "style = []\n", "broken.toml": "style = [\n"}
    messages = {"unknown.toml": "unknown key", "empty.toml": "non-empty list", "broken.toml": "not valid TOML"}
    for name, text in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=messages[name]):
            load_templates(tmp_path / name)
    with pytest.raises(ValueError, match="does not exist"):
        load_templates(tmp_path / "none.toml")


def test_cache_renders_whole_seed_rows_once(tmp_path: Path) -> None:
    sets = build_prompt_sets("x", "x", [], {"style": ["{} one", "{} two", "{} three"]}, ("style",))
    calls: list[tuple[list[str], list[int]]] = []

    def render(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        calls.append((prompts, seeds))
        # image (seed s, prompt p) is a flat grey of level (10 s + p) / 255: traceable after the PNG round trip
        return torch.stack([torch.full((3, 4, 4), (10 * s + p) / 255) for s in seeds for p in range(len(prompts))])

    cache = ImageCache(tmp_path, "settings")
    images = cache.images("model", sets["style"], 7, render, batch=6)
    assert calls == [(["x one", "x two", "x three"], [0, 1]), (["x one"], [2])]  # the last row partial
    levels = [round(float(i.mean()) * 255) for i in images]
    assert levels == [0, 1, 2, 10, 11, 12, 20]  # image k: prompt k mod 3, seed k div 3
    assert cache.path("model", sets["style"], 2, 1).is_file() and not cache.path("model", sets["style"], 1, 2).exists()
    cache.path("model", sets["style"], 1, 1).unlink()
    calls.clear()
    again = cache.images("model", sets["style"], 7, render, batch=6)
    assert calls == [(["x one", "x two", "x three"], [1])]  # only the row with a missing image
    torch.testing.assert_close(again, images)
    # an edited template is another prompt: its images are drawn anew
    edited = build_prompt_sets("x", "x", [], {"style": ["{} one", "{} 2", "{} three"]}, ("style",))
    calls.clear()
    cache.images("model", edited["style"], 3, render, batch=6)
    assert calls == [(["x one", "x 2", "x three"], [0])]
    assert cache.path("model", edited["style"], 0, 0) == cache.path("model", sets["style"], 0, 0)
    assert cache.path("model", edited["style"], 1, 0) != cache.path("model", sets["style"], 1, 0)


def test_file_key_follows_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"one")
    first = file_key(path)
    path.write_bytes(b"two")
    assert first.startswith("a-") and file_key(path) != first


def test_adapter_arguments_and_bad_input(tmp_path: Path, capsys, random_adapter: Path) -> None:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    for name in ("b.safetensors", "a.safetensors"):
        (sweep / name).write_bytes(random_adapter.read_bytes())
    (sweep / "notes.txt").write_text("not an adapter")
    assert expand_adapters([str(sweep), str(random_adapter)]) == [
        sweep / "a.safetensors",
        sweep / "b.safetensors",
        random_adapter,
    ]
    (tmp_path / "empty").mkdir()
    cases = {
        "does not exist": ["--adapters", str(tmp_path / "missing.safetensors")],
        "holds no .safetensors": ["--adapters", str(tmp_path / "empty")],
        "is not a .safetensors file": ["--adapters", str(sweep / "notes.txt")],
        "an adapter itself": ["--adapters", str(random_adapter), "--output-dir", str(random_adapter)],
        "--trigger is required": ["--pretrained-model", "tiny-sd", "--adapters", str(random_adapter)],
        "has shape": ["--pretrained-model", "tiny-sd", "--trigger", "x", "--adapters", str(random_adapter)],
    }
    for message, argv in cases.items():
        assert main(["evaluate", "--output-dir", str(tmp_path / "out"), *argv]) == 2  # a later option wins
        error = capsys.readouterr().err
        assert error.startswith("beyondlora evaluate: error:") and message in error, (message, error)
    assert not (tmp_path / "out").exists()
