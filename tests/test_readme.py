"""Every code block of README.md runs as pasted: the Python blocks in order in one namespace, the
``beyondlora`` command lines of the shell blocks through the CLI, all in a scratch folder; the two set-up
blocks are what CI runs, so the test checks that ``.ci/run`` runs exactly the README's test command."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from beyondlora.cli import main

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer((ROOT / "README.md").read_text())]


def _is_setup(code: str) -> bool:
    return code.startswith("python3 -m venv .venv")


def test_every_block_is_python_shell_or_text() -> None:
    languages = {language for language, _ in _blocks()}
    assert languages <= {"python", "bash", "text"}, languages


def test_ci_runs_the_readme_test_command() -> None:
    setups = [code.strip() for language, code in _blocks() if language == "bash" and _is_setup(code)]
    assert len(setups) == 2, setups  # the main job, then the tests
    assert setups[0].endswith(".venv/bin/beyondlora train")
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert setups[1] in ci, "the test command in .ci/run differs from README.md's"


def test_readme_blocks_run_as_pasted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": "readme"}
    ran = 0
    for number, (language, code) in enumerate(_blocks()):
        if language == "python":
            exec(compile(code, f"README.md block {number}", "exec"), namespace)
            ran += 1
        elif language == "bash" and not _is_setup(code):
            for line in code.splitlines():
                argv = shlex.split(line, comments=True)
                assert argv and argv[0] == "beyondlora", (
                    f"README.md block {number}: {line!r} is not a beyondlora command"
                )
                assert main(argv[1:]) == 0, line
                ran += 1
    assert ran >= 10
