"""Where the tools write: never over one of their own inputs unless told to, with the permissions a plain
file gets, in the format the path names, and nothing at all when there is nothing to do."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

import beyondlora as bl
from beyondlora.cli import main
from helpers.tool_cases import low_rank, planted_model, save_state, state_of


@pytest.fixture
def files(tmp_path: Path) -> Path:
    base = state_of(planted_model())
    save_state(base, tmp_path / "base.safetensors")
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["lin.weight"] += low_rank(64, 48, 2, torch.Generator().manual_seed(0))
    save_state(tuned, tmp_path / "tuned.safetensors")
    torch.manual_seed(1)
    lora = bl.get_peft_model(planted_model(), bl.LoraConfig(r=2, target_modules=["lin"], init_weights=False))
    lora.save_pretrained(str(tmp_path / "lora.safetensors"))
    lokr = bl.get_peft_model(planted_model(), bl.LoKrConfig(r=2, target_modules=["lin"], init_weights=False))
    lokr.save_pretrained(str(tmp_path / "lokr.safetensors"))
    return tmp_path


def _fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    return err


@pytest.mark.parametrize(
    "argv, victim",
    [
        (["merge", "{d}/base.safetensors", "{d}/lora.safetensors", "--out", "{d}/lora.safetensors"], "lora"),
        (["merge", "{d}/base.safetensors", "{d}/lora.safetensors", "--out", "{d}/base.safetensors"], "base"),
        (["extract", "{d}/base.safetensors", "{d}/tuned.safetensors", "{d}/tuned.safetensors"], "tuned"),
        (["resize", "{d}/lora.safetensors", "{d}/lora.safetensors", "--rank", "1"], "lora"),
        (["convert", "{d}/lora.safetensors", "{d}/lora.safetensors", "--dtype", "fp16"], "lora"),
    ],
)
def test_an_output_that_is_an_input_needs_overwrite(files, capsys, argv, victim) -> None:
    argv = [a.replace("{d}", str(files)) for a in argv]
    target = files / f"{victim}.safetensors"
    before = target.read_bytes()
    err = _fails(capsys, *argv)
    assert "an input of this command" in err and "--overwrite" in err and str(target) in err
    assert target.read_bytes() == before
    assert main([*argv, "--overwrite"]) == 0
    assert target.read_bytes() != before


def test_outputs_get_the_permissions_of_a_plain_file(files) -> None:
    previous = os.umask(0o022)
    try:
        assert main(["resize", str(files / "lora.safetensors"), str(files / "small.safetensors"), "--rank", "1"]) == 0
        model = bl.get_peft_model(planted_model(), bl.LoraConfig(r=2, target_modules=["lin"]))
        model.save_pretrained(str(files / "saved.safetensors"))
        model.save_pretrained(str(files / "folder"))
    finally:
        os.umask(previous)
    for path in (files / "small.safetensors", files / "saved.safetensors", files / "folder/adapter_model.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_a_conversion_to_a_non_safetensors_file_is_an_error(files, capsys) -> None:
    err = _fails(capsys, "convert", str(files / "lora.safetensors"), str(files / "out.txt"))
    assert "out.txt" in err and ".safetensors" in err
    assert not (files / "out.txt").exists()


def test_resize_with_nothing_to_resize_writes_nothing(files, capsys) -> None:
    err = _fails(capsys, "resize", str(files / "lokr.safetensors"), str(files / "small.safetensors"), "--rank", "1")
    assert "nothing to resize" in err and "lokr" in err
    assert not (files / "small.safetensors").exists()


def test_merging_a_model_into_a_model_names_the_mistake(files, capsys) -> None:
    base = str(files / "base.safetensors")
    err = _fails(capsys, "merge", base, base, "--out", str(files / "merged.safetensors"))
    assert "is not an adapter" in err and "base.safetensors" in err
    assert not (files / "merged.safetensors").exists()
