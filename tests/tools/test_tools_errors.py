"""Bad input to every tool: one clear line on stderr naming what and where, exit status 2, and nothing
written (not even a temporary file)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import beyondlora as bl
from beyondlora.cli import main
from helpers.tool_cases import low_rank, planted_model, save_state, state_of


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A base, a tuned model, a LoRA for it, and a zoo of broken inputs (read-only for the tests)."""
    root = tmp_path_factory.mktemp("inputs")
    base = state_of(planted_model())
    save_state(base, root / "base.safetensors")
    tuned = {k: v.clone() for k, v in base.items()}
    tuned["lin.weight"] += low_rank(64, 48, 2, torch.Generator().manual_seed(0))
    save_state(tuned, root / "tuned.safetensors")
    missing_key = {k: v for k, v in tuned.items() if k != "conv.bias"}
    save_state(missing_key, root / "missing_key.safetensors")
    other_shape = dict(tuned, **{"lin.weight": torch.randn(64, 40)})
    save_state(other_shape, root / "other_shape.safetensors")
    torch.manual_seed(1)
    model = bl.get_peft_model(planted_model(), bl.LoraConfig(r=2, target_modules=["lin", "conv"], init_weights=False))
    model.save_pretrained(str(root / "lora.safetensors"))
    model.save_pretrained(str(root / "folder"))
    lora = load_file(root / "lora.safetensors")
    save_file(
        {k.replace("lycoris_lin", "lycoris_decoder_attn"): v for k, v in lora.items()}, root / "other.safetensors"
    )
    wrong = dict(lora, **{"lycoris_lin.lora_down.weight": torch.randn(2, 40)})
    save_file(wrong, str(root / "wrong_shape.safetensors"))
    save_file(dict(lora, **{"lycoris_lin.lora_up.weight": torch.full((64, 2), float("nan"))}), root / "nan.safetensors")
    save_file(dict(lora, **{"lycoris_lin.lora_up.weight": torch.full((64, 2), 1e6)}), root / "huge.safetensors")
    (root / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all")
    data = (root / "base.safetensors").read_bytes()
    (root / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (root / "exists").mkdir()
    return root


def _run(files, tmp_path, capsys, *args: str) -> str:
    """Run the CLI with ``{in}`` / ``{out}`` placeholders; check status, message and that nothing was written."""
    argv = [a.replace("{in}", str(files)).replace("{out}", str(tmp_path)) for a in args]
    before_in = sorted(p.name for p in files.rglob("*"))
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"beyondlora {argv[0]}: error: "), captured.err
    assert list(tmp_path.iterdir()) == [], "an output or temporary file was left behind"
    assert sorted(p.name for p in files.rglob("*")) == before_in
    return lines[0]


CASES = {
    # extract
    "extract: missing base": (
        ["extract", "{in}/nope.safetensors", "{in}/tuned.safetensors", "{out}/a.safetensors"],
        ["model not found", "nope.safetensors"],
    ),
    "extract: not safetensors": (
        ["extract", "{in}/garbage.safetensors", "{in}/tuned.safetensors", "{out}/a.safetensors"],
        ["garbage.safetensors is not a readable safetensors file"],
    ),
    "extract: truncated": (
        ["extract", "{in}/base.safetensors", "{in}/truncated.safetensors", "{out}/a.safetensors"],
        ["truncated.safetensors is not a readable safetensors file"],
    ),
    "extract: missing key": (
        ["extract", "{in}/base.safetensors", "{in}/missing_key.safetensors", "{out}/a.safetensors"],
        ["missing_key.safetensors lacks 1 key(s)", "conv.bias"],
    ),
    "extract: shape mismatch": (
        ["extract", "{in}/base.safetensors", "{in}/other_shape.safetensors", "{out}/a.safetensors"],
        ["lin.weight: shape (64, 48)", "(64, 40)", "other_shape.safetensors"],
    ),
    "extract: nothing changed": (
        ["extract", "{in}/base.safetensors", "{in}/base.safetensors", "{out}/a.safetensors"],
        ["does not differ", "nothing to extract"],
    ),
    "extract: mode without param": (
        ["extract", "{in}/base.safetensors", "{in}/tuned.safetensors", "{out}/a.safetensors", "--mode", "ratio"],
        ["'ratio' needs a parameter"],
    ),
    "extract: no such cuda device": (  # no machine has a 100th GPU; a CPU-only one has no CUDA at all
        ["extract", "{in}/base.safetensors", "{in}/tuned.safetensors", "{out}/a.safetensors", "--device", "cuda:99"],
        ["--device cuda:99: "],
    ),
    "extract: output not a file": (
        ["extract", "{in}/base.safetensors", "{in}/tuned.safetensors", "{out}/adapter"],
        ["adapter: the extracted adapter is a single .safetensors file"],
    ),
    # merge
    "merge: adapter for another model": (
        ["merge", "{in}/base.safetensors", "{in}/other.safetensors", "--out", "{out}/m.safetensors"],
        ["other.safetensors", "match no module", "lycoris_decoder_attn", "base.safetensors"],
    ),
    "merge: wrong shape": (
        ["merge", "{in}/base.safetensors", "{in}/wrong_shape.safetensors", "--out", "{out}/m.safetensors"],
        ["wrong_shape.safetensors", "lycoris_lin", "(2, 40)", "expected (2, 48)"],
    ),
    "merge: missing adapter": (
        ["merge", "{in}/base.safetensors", "{in}/nope.safetensors", "--out", "{out}/m.safetensors"],
        ["adapter not found", "nope.safetensors"],
    ),
    "merge: nan": (
        ["merge", "{in}/base.safetensors", "{in}/nan.safetensors", "--out", "{out}/m.safetensors"],
        ["nan.safetensors", "lycoris_lin.lora_up.weight", "NaN"],
    ),
    "merge: overflow mid-stream": (
        ["merge", "{in}/base.safetensors", "{in}/huge.safetensors", "--out", "{out}/m.safetensors", "--dtype", "fp16"],
        ["lin.weight", "overflows torch.float16"],
    ),
    "merge: multipliers": (
        [
            "merge",
            "{in}/base.safetensors",
            "{in}/lora.safetensors",
            "{in}/lora.safetensors",
            "--out",
            "{out}/m.safetensors",
        ]
        + ["--multiplier", "1", "2", "3"],
        ["one per adapter (2), not 3"],
    ),
    "merge: base is a model file, output a folder": (
        ["merge", "{in}/base.safetensors", "{in}/lora.safetensors", "--out", "{out}/merged"],
        ["merged: a single-file base is merged into a .safetensors file"],
    ),
    "merge: output is the base": (
        ["merge", "{in}/base.safetensors", "{in}/lora.safetensors", "--out", "{in}/base.safetensors"],
        ["is the base model itself"],
    ),
    # resize
    "resize: no rank": (["resize", "{in}/lora.safetensors", "{out}/r.safetensors"], ["give --rank N"]),
    "resize: bad param": (
        [
            "resize",
            "{in}/lora.safetensors",
            "{out}/r.safetensors",
            "--dynamic-method",
            "sv_fro",
            "--dynamic-param",
            "2",
        ],
        ["sv_fro is a share of the spectrum in (0, 1], got 2.0"],
    ),
    "resize: folder source": (
        ["resize", "{in}/folder", "{out}/r.safetensors", "--rank", "1"],
        ["folder: resize reads a .safetensors single file"],
    ),
    # convert
    "convert: folder without base": (  # a file without our metadata (ours record module paths and layers)
        ["convert", "{in}/other.safetensors", "{out}/folder"],
        ["needs the base model (--base MODEL)", "does not record its modules' paths and layers"],
    ),
    "convert: wrong base": (
        ["convert", "{in}/other.safetensors", "{out}/folder", "--base", "{in}/base.safetensors"],
        ["match no module", "lycoris_decoder_attn"],
    ),
    # inspect
    "inspect: a model, not an adapter": (
        ["inspect", "{in}/base.safetensors"],
        ["base.safetensors", "a model checkpoint rather than an adapter?"],
    ),
    "inspect: missing": (["inspect", "{in}/nope.safetensors"], ["adapter not found", "nope.safetensors"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_fails_cleanly(files, tmp_path, capsys, case) -> None:
    args, fragments = CASES[case]
    message = _run(files, tmp_path, capsys, *args)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_existing_output_folder_is_refused(files, tmp_path, capsys) -> None:
    base = tmp_path / "base"
    base.mkdir()
    save_state(state_of(planted_model()), base / "model.safetensors")
    (tmp_path / "merged").mkdir()
    code = main(["merge", str(base), str(files / "lora.safetensors"), "--out", str(tmp_path / "merged")])
    assert code == 2 and "merged exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "merged"]
    assert list((tmp_path / "merged").iterdir()) == []


def test_subprocess_reports_one_line_and_status_2(files, tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "beyondlora", "merge", str(files / "base.safetensors"), str(files / "other.safetensors")]
        + ["--out", str(tmp_path / "m.safetensors")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("beyondlora merge: error: ")
    assert not (tmp_path / "m.safetensors").exists()
