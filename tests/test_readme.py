"""The README's quickstart stays true: the commands without `make` are the ones the Makefile runs, the extra
it installs exists, and every `llmlab` subcommand the README shows is one the CLI has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from llmlab.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block_after(marker: str) -> list[str]:
    """The commands (comments stripped) of the first ```bash block after `marker`."""
    start = README.index(marker)
    block = README[start:].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def _subcommands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return set(sub.choices)


def test_quickstart_without_make_matches_the_makefile():
    commands = _block_after("Without `make`")
    assert commands[0] == "python -m venv .venv"
    install = next(c for c in commands if c.startswith("pip install"))
    extra = re.search(r"\.\[(\w+)\]", install).group(1)
    pyproject = (ROOT / "pyproject.toml").read_text()
    extras = pyproject.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    assert re.search(rf"^{extra} = \[", extras, flags=re.M), f"no extra [{extra}] in pyproject.toml"
    makefile = (ROOT / "Makefile").read_text()
    assert f"pip install --quiet -e '.[{extra}]'" in makefile  # `make test` installs the same extra
    assert "llmlab demo" in commands and "$(BIN)/llmlab demo" in makefile
    pytest = next(c for c in commands if c.startswith("pytest"))
    workers = re.search(r"^TEST_WORKERS \?= (\d+)$", makefile, flags=re.M).group(1)
    run = re.search(r"\$\(BIN\)/python -m pytest -q (.*)$", makefile, flags=re.M).group(1)
    assert pytest == "pytest " + run.replace("$(TEST_WORKERS)", workers)  # the suite as `make test` runs it
    ruff = re.search(r"after `(ruff check [^`]+)`", README).group(1)
    assert f"$(BIN)/{ruff}" in makefile  # the lint step README names is the one `make test` runs
    assert 'testpaths = ["tests"]' in pyproject  # a bare `pytest` at the root runs the suite


def test_every_llmlab_command_in_the_readme_exists():
    known = _subcommands()
    used = set()
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.splitlines():
            words = shlex.split(line.split("#", 1)[0], posix=True) if line.strip() else []
            for i, word in enumerate(words):
                if word == "llmlab" and i + 1 < len(words) and not words[i + 1].startswith("-"):
                    used.add(words[i + 1])
    assert used, "no llmlab command found in the README"
    assert used <= known, f"README shows commands the CLI lacks: {sorted(used - known)}"
