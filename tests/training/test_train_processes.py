"""``beyondlora train`` as real processes: two under torchrun (gloo, CPU) equal one with the same global
batch and write once; a run killed with SIGKILL resumes from its last checkpoint to the same adapter."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_train_config import make_dataset

from beyondlora.training.settings import TrainConfig
from beyondlora.training.trainer import train

ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    "--pretrained-model",
    "tiny-sd",
    "--random-flip",
    "--shuffle-caption",
    "--sample-seeds",
    "0",
    "--sample-steps",
    "2",
    "--rank",
    "4",
    "--threads",
    "1",
]


def train_module(data: Path, out: Path, **options: Any) -> list[str]:
    """``-m beyondlora train`` with COMMON, the data and output folders and ``options`` as flags
    (``batch_size=2`` → ``--batch-size 2``; ``True`` → a bare flag)."""
    arguments = ["-m", "beyondlora", "train", *COMMON, "--train-data-dir", str(data), "--output-dir", str(out)]
    for name, value in options.items():
        arguments += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return arguments


def environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    env.pop("WORLD_SIZE", None)
    return env


def in_process(data: Path, out: Path, **changes: Any) -> Path:
    values: dict[str, Any] = dict(
        pretrained_model="tiny-sd",
        train_data_dir=str(data),
        output_dir=str(out),
        random_flip=True,
        shuffle_caption=True,
        sample_seeds=[0],
        sample_steps=2,
        rank=4,
    )
    values.update(changes)
    assert train(TrainConfig(**values)) == 0
    return out


@pytest.mark.parametrize(
    "flags",
    [
        {},
        # DyLoRA draws its rank block per step; accumulation skips the first micro-batch's all-reduce; DDP
        # over two wrapped models
        {"algo": "dylora", "gradient_accumulation": 2, "train_text_encoder": True},
    ],
    ids=["lokr", "dylora-accumulation-text-encoder"],
)
def test_two_processes_under_torchrun_equal_one(tmp_path: Path, flags: dict[str, Any]) -> None:
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    arguments = train_module(data, out, batch_size=1, max_steps=3, save_every=2, **flags)
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", *arguments]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("data-parallel over 2 processes") == 1
    assert done.stdout.count(f"trained {flags.get('algo', 'lokr')} for 3 steps") == 1  # only the main process
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # written once, not once per process
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    single = in_process(data, tmp_path / "single", batch_size=2, max_steps=3, save_every=2, **flags)
    ddp, one = load_file(str(out / "adapter.safetensors")), load_file(str(single / "adapter.safetensors"))
    assert ddp.keys() == one.keys()
    moved = 0
    for key in one:
        # Each step moves a weight by up to lr = 4e-3; Adam turns float noise in a near-zero gradient into a
        # visible step, so allow 1e-4.  Unaveraged gradients (each process its own) move weights by ~lr.
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-3, atol=1e-4)
        moved += not torch.equal(one[key], torch.zeros_like(one[key]))
    assert moved


def test_sigkill_then_resume_finishes_the_same(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "killed"
    steps = 12
    command = [sys.executable, *train_module(data, out, batch_size=2, max_steps=steps, save_every=2)]
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 180
    while not (out / "checkpoints" / "step-000004").is_dir():
        assert process.poll() is None, process.stderr.read().decode()[-3000:] if process.stderr else ""
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    if process.stderr:
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "adapter.safetensors").exists(), "the run finished before it could be killed"
    kept = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    assert "step-000004" in kept  # what was checkpointed survives the kill
    in_process(data, out, batch_size=2, max_steps=steps, save_every=2, resume=True)
    recorded = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert recorded == list(range(1, steps + 1))
    straight = in_process(data, tmp_path / "straight", batch_size=2, max_steps=steps, save_every=2)
    first, second = load_file(str(out / "adapter.safetensors")), load_file(str(straight / "adapter.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("signal_number", [signal.SIGINT])
def test_ctrl_c_in_a_real_process_saves(tmp_path: Path, signal_number: int) -> None:
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "interrupted"
    command = [sys.executable, *train_module(data, out, batch_size=2, max_steps=200, save_every=100)]
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 180
    while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal_number)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 130, stdout
    assert "interrupted at step" in stdout
    saved = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(saved) == 1 and int(saved[0].split("-")[1]) < 200


def test_accelerate_launch_runs_the_same_command(tmp_path: Path) -> None:
    """``accelerate launch -m beyondlora train …`` (one CPU process: accelerate needs MPI for more on CPU)
    trains exactly as the plain command does."""
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "launched"
    launcher = Path(sys.executable).with_name("accelerate")
    arguments = train_module(data, out, batch_size=2, max_steps=2)
    command = [str(launcher), "launch", "--cpu", "--num_processes", "1", *arguments]
    done = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "trained lokr for 2 steps" in done.stdout
    plain = in_process(data, tmp_path / "plain", batch_size=2, max_steps=2)
    launched, direct = load_file(str(out / "adapter.safetensors")), load_file(str(plain / "adapter.safetensors"))
    assert launched.keys() == direct.keys() and all(torch.equal(launched[k], direct[k]) for k in direct)
