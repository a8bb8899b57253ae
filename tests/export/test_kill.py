"""A CLI run killed with SIGKILL mid-write: the target is intact or absent, the next run succeeds and tidies."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import models
import pytest
from export_kit import tiny_tokenizer, tree
from typer.testing import CliRunner

import attnedit
from attnedit.cli.main import app

KILLABLE = Path(__file__).with_name("killable.py")
RECIPE = (
    "name: kill-test\ninterventions:\n  - {type: head_prune, heads: {1: [0, 2]}}\n  - {type: zerotuning, gamma: 2.0}\n"
)
runner = CliRunner()
OTHER = "name: kill-other\ninterventions:\n  - {type: head_prune, heads: {0: [1]}}\n"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    models.tiny("mistral").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def start(args, pause: str | None, mark: Path) -> subprocess.Popen:
    env = {**os.environ, "KILLABLE_MARK": str(mark), "HF_HUB_OFFLINE": "1"}
    env.pop("KILLABLE_PAUSE", None)
    if pause:
        env["KILLABLE_PAUSE"] = pause
    cmd = [sys.executable, str(KILLABLE), *map(str, args)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run(args):
    """The same command in this process (only the run to kill needs a process of its own)."""
    return runner.invoke(app, [str(a) for a in args])


def leftovers(target: Path) -> list[str]:
    """The hidden names beside `target` that belong to it (temporary files, `.partial` / `.old` folders)."""
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; fail if it ended or never got there."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (rc {proc.returncode}) before the kill point:\n{out.decode()}\n{err.decode()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run never reached the kill point")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL  # killed, not finished


def export_args(base_dir, rec: Path, out: Path, *extra):
    return ["export", rec, "--model", base_dir, "--out", out, "--dtype", "float32", "--device", "cpu", *extra]


@pytest.mark.parametrize(
    ("point", "existing"),
    [("weights", False), ("weights", True), ("swap", True)],
    ids=["weights-new", "weights-replace", "swap"],
)
def test_export_killed_mid_write(base_dir, tmp_path, point, existing):
    rec, other = tmp_path / "recipe.yaml", tmp_path / "other.yaml"
    rec.write_text(RECIPE)
    other.write_text(OTHER)
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    before = None
    if existing:
        done = run(export_args(base_dir, other, out))
        assert done.exit_code == 0, done.output
        before = tree(out)
    mark = tmp_path / "mark"
    proc = start(export_args(base_dir, rec, out, "--force"), point, mark)
    suffix = ".partial" if point == "weights" else ".old"
    kill_when(proc, lambda: mark.exists() and any(n.endswith(suffix) for n in leftovers(out)))
    left = leftovers(out)
    assert any(n.endswith(suffix) for n in left), left  # the kill left something behind
    if point == "weights":
        assert (out.exists() and tree(out) == before) if existing else not out.exists()
    else:
        assert not out.exists() or tree(out) == before  # moved aside: absent, its previous version kept

    again = run(export_args(base_dir, rec, out, "--force"))
    assert again.exit_code == 0, again.output
    assert leftovers(out) == []
    assert sorted(os.listdir(out.parent)) == ["out"]
    assert tree(out) != before and (out / "model.safetensors").is_file()
    attnedit.load(str(out), dtype="float32", device="cpu")  # complete and loadable


def test_export_without_force_after_a_kill_during_the_swap_restores_the_previous_folder(base_dir, tmp_path):
    other = tmp_path / "other.yaml"
    other.write_text(OTHER)
    rec = tmp_path / "recipe.yaml"
    rec.write_text(RECIPE)
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    assert run(export_args(base_dir, other, out)).exit_code == 0
    before = tree(out)
    mark = tmp_path / "mark"
    proc = start(export_args(base_dir, rec, out, "--force"), "swap", mark)
    kill_when(proc, lambda: mark.exists())
    assert not out.exists() and len(leftovers(out)) == 2  # the `.old` and `.partial` folders
    refused = run(export_args(base_dir, rec, out))
    assert refused.exit_code == 2 and "pass --force" in refused.stderr
    assert tree(out) == before and leftovers(out) == []  # the previous export is back, whole


def test_export_killed_unpaused_as_soon_as_it_writes(base_dir, tmp_path):
    """No pause: kill the moment the `.partial` folder shows; retried if the run won the race."""
    rec = tmp_path / "recipe.yaml"
    rec.write_text(RECIPE)
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    for _ in range(5):
        proc = start(export_args(base_dir, rec, out), None, tmp_path / "unused")
        seen = []
        while proc.poll() is None and not seen:
            seen = [n for n in leftovers(out) if n.endswith(".partial")]
        if seen:
            proc.send_signal(signal.SIGKILL)
        proc.communicate()
        if proc.returncode == -signal.SIGKILL:
            break
        assert proc.returncode == 0, proc.stderr
        shutil.rmtree(out)
    else:
        pytest.fail("every run finished before it could be killed mid-write")
    assert not out.exists() or (out / "README.md").is_file()  # absent, or renamed in whole just before the kill
    again = run(export_args(base_dir, rec, out, "--force"))
    assert again.exit_code == 0, again.output
    assert sorted(os.listdir(out.parent)) == ["out"]
    attnedit.load(str(out), dtype="float32", device="cpu")


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replace"])
def test_cp_killed_before_the_rename(tmp_path, existing):
    target = tmp_path / "work" / "r.yaml"
    target.parent.mkdir()
    if existing:
        target.write_text("previous\n")
    mark = tmp_path / "mark"
    proc = start(["cp", "zerotuning-paper", target, "--force"], "tmpfile", mark)
    kill_when(proc, lambda: mark.exists() and leftovers(target))
    assert [n.endswith(".tmp") for n in leftovers(target)] == [True]
    assert (target.read_text() == "previous\n") if existing else not target.exists()
    again = run(["cp", "zerotuning-paper", target, "--force"])
    assert again.exit_code == 0, again.output
    assert sorted(os.listdir(target.parent)) == ["r.yaml"]
    assert "zerotuning" in target.read_text()
