"""The light commands (--help, --version, ls, cp, validate without a model) never import torch or
transformers (their start-up time is measured in benchmarks/startup.py); validate reports every
problem at once and warns on what is valid but likely not meant."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from attnedit import __version__
from attnedit.cli.main import app

runner = CliRunner()

PROBE = """
import sys
from attnedit.cli.main import app
sys.argv = ["attnedit", *{args!r}]
try:
    app()
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules)
print("HEAVY:" + ",".join(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["ls"],
        ["ls", "--methods"],
        ["cp", "act-paper", "{tmp}/r.yaml"],
        ["validate", "act-paper"],
    ],
)
def test_light_commands_import_no_torch(args, tmp_path):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = subprocess.run([sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, cwd=tmp_path)
    assert "HEAVY:\n" in done.stderr, done.stderr[-2000:]


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"attnedit {__version__}"


def test_validate_reports_field_and_model_problems_together(tmp_path, tiny_with_tokenizer):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "interventions:\n  - {type: zerotuning, gamma: -1}\n  - {type: act, heads: {40: [1]}}\n"
        "  - {type: act, heads: {1: [99]}}\n"
    )
    result = runner.invoke(app, ["validate", str(bad), "--model", str(tiny_with_tokenizer)])
    assert result.exit_code == 2
    assert "bad.yaml:2: interventions[0].gamma" in result.output
    assert "bad.yaml:3: interventions[1].heads[40]: layer 40 does not exist" in result.output
    assert "interventions[2].heads[1]: heads [99] do not exist" in result.output
    assert result.output.count("error:") == 1


def test_validate_warns_on_an_empty_recipe_and_on_mean_ablation_without_means(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("name: nothing\n")
    result = runner.invoke(app, ["validate", str(empty)])
    assert result.exit_code == 0 and "warning:" in result.output and "no interventions" in result.output
    mean = tmp_path / "mean.yaml"
    mean.write_text("interventions:\n  - {type: head_prune, ablation: mean, heads: {1: [2]}}\n")
    result = runner.invoke(app, ["validate", str(mean)])
    assert result.exit_code == 0 and "warning:" in result.output and "without 'means'" in result.output
    given = tmp_path / "given.yaml"
    given.write_text(
        "interventions:\n  - {type: head_prune, ablation: mean, heads: {1: [2]}, means: {1: {2: [0.5]}}}\n"
    )
    assert "warning:" not in runner.invoke(app, ["validate", str(given)]).output
