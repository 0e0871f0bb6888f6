"""The command line: --help, --version and the demo."""

from __future__ import annotations

import subprocess
import sys

import pytest

import beyondlora
from beyondlora.cli import main
from beyondlora.demos.cnn import DemoConfig, run_demo


def test_version_and_help(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and beyondlora.__version__ in capsys.readouterr().out
    assert main([]) == 0 and "demo" in capsys.readouterr().out


def test_python_dash_m() -> None:
    result = subprocess.run([sys.executable, "-m", "beyondlora", "--help"], capture_output=True, text=True, check=True)
    assert "usage: beyondlora" in result.stdout


def test_demo_adapts_and_round_trips(tmp_path) -> None:
    lines: list[str] = []
    figures = run_demo(
        DemoConfig(pretrain_steps=80, adapt_steps=60), output_dir=tmp_path / "adapter", echo=lines.append
    )
    assert figures["base_accuracy_original_domain"] > 0.9
    assert figures["adapted_accuracy_new_domain"] > figures["base_accuracy_new_domain"] + 0.15
    assert figures["reload_max_abs_diff"] < 1e-5 and figures["merged_max_abs_diff"] < 1e-5
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert any("LoKr adapter" in line for line in lines)


def test_optional_dependencies_do_not_chatter(tmp_path) -> None:
    """bitsandbytes' note about its missing 4-bit CPU kernels and transformers' about image processors without
    torchvision concern nothing the commands run."""
    result = subprocess.run(
        [sys.executable, "-m", "beyondlora", "train", "--help"], capture_output=True, text=True, check=True
    )
    assert "gemm_4bit" not in result.stderr and "kernels-community" not in result.stderr, result.stderr
    sample = ["sample", "--pretrained-model", "tiny-sd", "--prompt", "a thing", "--steps", "1", "--seeds", "0"]
    result = subprocess.run(
        [sys.executable, "-m", "beyondlora", *sample, "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stderr == "", result.stderr
