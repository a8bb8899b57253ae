"""Output files follow the user's umask, and what a killed run left beside its target is cleaned by the next."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from attnedit.cli.common import write_atomic
from attnedit.export import check_target, clean_stale, staged


@pytest.fixture
def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    write_atomic(tmp_path / "results.json", "{}\n")
    write_atomic(tmp_path / "plot.png", b"\x89PNG")
    for name in ("results.json", "plot.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


def test_an_export_folder_follows_the_umask(tmp_path, umask):
    umask(0o022)
    with staged(tmp_path / "out", force=False) as tmp:
        (tmp / "w").write_text("x")
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755


def test_temporary_files_of_a_killed_write_are_cleaned(tmp_path, dead_pid):
    stale = tmp_path / f".results.json.{dead_pid}.abcd1234.tmp"
    live = tmp_path / f".results.json.{os.getppid()}.abcd1234.tmp"  # a process that still runs
    other = tmp_path / f".other.json.{dead_pid}.abcd1234.tmp"
    for p in (stale, live, other):
        p.write_text("half")
    write_atomic(tmp_path / "results.json", "{}")
    assert not stale.exists() and live.exists() and other.exists()


def test_a_killed_exports_partial_folder_is_cleaned(tmp_path, dead_pid):
    out = tmp_path / "export"
    partial = tmp_path / f".export.{dead_pid}-abcd1234.partial"
    running = tmp_path / f".export.{os.getppid()}-abcd1234.partial"
    legacy = tmp_path / ".export.abcd1234.partial"  # named before names held the process id
    for p in (partial, running, legacy):
        p.mkdir()
        (p / "model.safetensors").write_bytes(b"x" * 100)
    check_target(out, force=False)
    assert not partial.exists() and not legacy.exists() and running.exists()


def test_an_old_folder_is_put_back_when_the_kill_came_between_the_renames(tmp_path, dead_pid):
    out = tmp_path / "export"
    old = tmp_path / f".export.{dead_pid}-abcd1234.old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    clean_stale(out)
    assert (out / "config.json").is_file() and not old.exists()


def test_an_old_folder_beside_its_target_is_deleted(tmp_path, dead_pid):
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text("new")
    old = tmp_path / f".export.{dead_pid}-abcd1234.old"
    old.mkdir()
    clean_stale(out)
    assert not old.exists() and (out / "config.json").read_text() == "new"
