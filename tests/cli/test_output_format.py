"""What the commands print outside a terminal: Markdown tables whose cells never wrap, whole defaults in
--help, progress lines with done/total, rate and time left, and a calibrated choice in words."""

from __future__ import annotations

import io
import json
import subprocess
import sys

from rich.table import Table
from typer.testing import CliRunner

from attnedit.cli import inspect as command
from attnedit.cli.calibrate import readable
from attnedit.cli.common import markdown
from attnedit.cli.main import app
from attnedit.progress import Lines

runner = CliRunner()


def test_markdown_keeps_each_row_on_one_line():
    t = Table(title="act-paper on smollm2-135m-instruct", caption="difference: patched - baseline")
    for col in ("task", "diff [95% CI]"):
        t.add_column(col, justify="right" if col != "task" else "left")
    t.add_row("facts-conflict-with-a-long-name", "[green]+0.100[/]\n[+0.020, +0.180]")
    text = markdown(t)
    assert "| facts-conflict-with-a-long-name | +0.100 [+0.020, +0.180] |" in text.splitlines()
    assert "|---|---:|" in text and text.splitlines()[0] == "act-paper on smollm2-135m-instruct"
    assert "[green]" not in text


def test_ls_outside_a_terminal_prints_whole_names():
    result = runner.invoke(app, ["ls"])
    assert result.exit_code == 0
    rows = [line for line in result.output.splitlines() if line.startswith("| ")]
    assert any(line.startswith("| act-paper | act |") for line in rows)
    assert all(line.endswith("|") for line in rows)  # one line per recipe, however long its description


def test_help_outside_a_terminal_shows_defaults_whole():
    done = subprocess.run([sys.executable, "-m", "attnedit.cli", "eval", "--help"], capture_output=True, text=True)
    assert done.returncode == 0
    assert "(default: attnedit-eval/<recipe>_<model>)" in done.stdout
    assert "[default: 10000]" in done.stdout


def test_progress_lines_say_done_total_rate_and_time_left():
    out = io.StringIO()
    lines = Lines("scoring sst2", 4, every=0.0, stream=out)
    for _ in range(4):
        lines.advance()
    lines.close()
    text = out.getvalue().splitlines()
    assert text[0].startswith("scoring sst2: 1/4 (") and "/s, ETA " in text[0]
    assert text[-1].startswith("scoring sst2: 4/4 (") and "done in" in text[-1]
    assert len(text) == 4  # a line per step (every=0) until the end, then the closing line


def test_a_calibrated_choice_reads_as_words():
    assert readable({"gamma": 2.0, "heads": {3: [1, 2], 5: [0]}, "scores": {"3.1": 0.2}}) == (
        "gamma=2; 3 heads in 2 layers (L3: 1,2; L5: 0)"
    )
    many = readable({"heads": {layer: list(range(9)) for layer in range(30)}})
    assert many.startswith("270 heads in 30 layers (L0: 0,1,") and many.endswith("...)") and len(many) < 120


def test_inspect_shows_decoded_tokens_and_names_its_run(tmp_path, tiny_with_tokenizer, monkeypatch):
    captions = []
    monkeypatch.setattr(command, "_caption", lambda report, width=110: captions.append(report) or "caption")
    png = tmp_path / "map.png"
    args = ["inspect", "-p", "the cat sat", "--model", str(tiny_with_tokenizer), "--png", str(png), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert " " in report["tokens"] and not any("Ġ" in t for t in report["tokens"])  # text, not byte-level pieces
    assert captions[0]["prompt"] == "the cat sat" and captions[0]["model"] == str(tiny_with_tokenizer)
    assert png.is_file()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0
