"""Every code block of README.md and docs/ runs as pasted: README's Python blocks in order in one namespace,
the ``beyondlora`` command lines of the shell blocks through the CLI, all in a scratch folder (with a copy of
``examples/``); each docs page's
Python blocks in order in a fresh interpreter (a page may define an algorithm, which registers itself).  The
two set-up blocks are what CI runs, so the test checks that ``.ci/run`` runs exactly the README's test command."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from beyondlora.cli import main

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


DOCS = sorted((ROOT / "docs").glob("*.md"))


def _blocks(page: Path = ROOT / "README.md") -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in BLOCK.finditer(page.read_text())]


def _is_setup(code: str) -> bool:
    return code.startswith("python3 -m venv .venv")


def test_every_block_is_python_shell_or_text() -> None:
    languages = {language for page in [ROOT / "README.md", *DOCS] for language, _ in _blocks(page)}
    assert languages <= {"python", "bash", "text"}, languages


def test_docs_pages_are_linked_from_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    assert DOCS and all(f"docs/{page.name}" in readme for page in DOCS)


@pytest.mark.parametrize("page", DOCS, ids=[p.name for p in DOCS])
def test_docs_blocks_run_as_pasted(page: Path, tmp_path: Path) -> None:
    blocks = _blocks(page)
    assert all(language != "bash" for language, _ in blocks), "docs pages show Python; commands belong in README"
    code = "\n\n".join(code for language, code in blocks if language == "python")
    if not code:
        return
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{page.name}:\n{run.stderr[-3000:]}"


def test_ci_runs_the_readme_test_command() -> None:
    setups = [code.strip() for language, code in _blocks() if language == "bash" and _is_setup(code)]
    assert len(setups) == 2, setups  # the main job, then the tests
    assert setups[0].endswith(".venv/bin/beyondlora train")
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert setups[1] in ci, "the test command in .ci/run differs from README.md's"


def test_readme_blocks_run_as_pasted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(ROOT / "examples", tmp_path / "examples")  # commands run where a checkout's files are
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
