"""Every command fed bad input: exit 2, one `error:` line, no traceback, no file left behind, and where the
check is cheap, no model loaded first."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from attnedit import hub, loading
from attnedit.cli.main import app

runner = CliRunner()
ZT = "interventions:\n  - {type: zerotuning, gamma: 2.0}\n"


@pytest.fixture
def work(tmp_path, monkeypatch, tiny_with_tokenizer):
    """A folder with the bad files the cases name, as the current folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "zt.yaml").write_text(ZT)
    (tmp_path / "ph3.yaml").write_text("interventions:\n  - {type: head_prune, ablation: zero}\n")
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "b100.gguf").write_bytes(os.urandom(100))
    (tmp_path / "random.gguf").write_bytes(os.urandom(200_000))
    (tmp_path / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x05")
    cut = tmp_path / "cut-model"
    cut.mkdir()
    for f in tiny_with_tokenizer.iterdir():
        data = f.read_bytes()
        (cut / f.name).write_bytes(data[:1000] if f.suffix == ".safetensors" else data)
    (tmp_path / "anchor.yaml").write_text("interventions: &a [*a]\n")
    (tmp_path / "bool.yaml").write_text("interventions:\n  - {type: zerotuning, gamma: true}\n")
    (tmp_path / "str.yaml").write_text('interventions:\n  - {type: zerotuning, gamma: "2"}\n')
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81" * 50)
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "exists.png").write_bytes(b"png")
    (tmp_path / "null.yaml").write_text(
        "name: nulls\nkind: classification\nlabels: {a: good, b: bad}\ntemplate: '{text}'\n"
        "local: {format: jsonl, test: rows.jsonl, carve: {train: 2}}\n"
    )
    (tmp_path / "rows.jsonl").write_text("".join('{"text": null, "label": "a"}\n' for _ in range(6)))
    (tmp_path / "cls.yaml").write_text(
        "name: cls\nkind: classification\nlabels: {a: good, b: bad}\ntemplate: '{text}'\n"
        "local: {format: jsonl, test: cls.jsonl, carve: {train: 32}}\n"
    )
    (tmp_path / "cls.jsonl").write_text(
        "".join(f'{{"text": "row {i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(48))
    )
    return tmp_path


T = "{tiny}"
CASES = [
    # (name, command line, what the error says, cheap: no model is loaded before the error)
    ("empty gguf", ["validate", "zt.yaml", "--model", "empty.gguf"], "is empty", True),
    ("100-byte gguf", ["validate", "zt.yaml", "--model", "b100.gguf"], "not a GGUF file", True),
    ("random gguf", ["apply", "zt.yaml", "--model", "random.gguf", "-p", "hi"], "not a GGUF file", True),
    ("truncated gguf", ["validate", "zt.yaml", "--model", "truncated.gguf"], "truncated or damaged GGUF", True),
    ("truncated safetensors", ["apply", "zt.yaml", "--model", "cut-model", "-p", "hi"], "cut-model", False),
    ("recursive anchor", ["validate", "anchor.yaml"], "anchor.yaml:1", True),
    ("gamma: true", ["validate", "bool.yaml"], "bool.yaml:2: interventions[0].gamma", True),
    ('gamma: "2"', ["validate", "str.yaml"], "str.yaml:2: interventions[0].gamma", True),
    ("binary prompts file", ["apply", "zt.yaml", "--model", T, "--prompts-file", "binary.txt"], "not UTF-8", True),
    (
        "prompts file /dev/null",
        ["apply", "zt.yaml", "--model", T, "--prompts-file", "/dev/null"],
        "not a regular",
        True,
    ),
    ("folder as prompts file", ["apply", "zt.yaml", "--model", T, "--prompts-file", "a-folder"], "is a folder", True),
    (
        "cache-dir is a file",
        ["validate", "zt.yaml", "--model", loading.DEFAULT_MODEL, "--cache-dir", "a-file"],
        "a-file is a file",
        True,
    ),
    (
        "cache-dir under /proc",
        ["apply", "zt.yaml", "-p", "hi", "--cache-dir", "/proc/attnedit"],
        "/proc/attnedit",
        True,
    ),
    ("negative seed", ["eval", "zt.yaml", "--model", T, "-t", "facts-conflict", "--seed", "-5"], "--seed -5", True),
    ("empty inspect prompt", ["inspect", "--prompt", "", "--model", T], "--prompt is empty", True),
    ("apply --out under /proc", ["apply", "zt.yaml", "--model", T, "-p", "hi", "--out", "/proc/x.json"], "/proc", True),
    ("apply --out under /sys", ["apply", "zt.yaml", "--model", T, "-p", "hi", "--out", "/sys/x.json"], "/sys", True),
    ("apply --out a folder", ["apply", "zt.yaml", "--model", T, "-p", "hi", "--out", "a-folder"], "is a folder", True),
    (
        "eval --out under /proc",
        ["eval", "zt.yaml", "--model", T, "-t", "facts-conflict", "--out", "/proc/e"],
        "/proc",
        True,
    ),
    ("eval --out a file", ["eval", "zt.yaml", "--model", T, "-t", "facts-conflict", "--out", "a-file"], "a file", True),
    (
        "eval --data-dir a file",
        ["eval", "zt.yaml", "--model", T, "-t", "sst2", "--data-dir", "a-file"],
        "is a file",
        True,
    ),
    ("eval null text field", ["eval", "zt.yaml", "--model", T, "-t", "null.yaml"], "'text' is null", True),
    ("inspect --png a folder", ["inspect", "-p", "hi", "--model", T, "--png", "a-folder"], "is a folder", True),
    ("inspect --png exists", ["inspect", "-p", "hi", "--model", T, "--png", "exists.png"], "--force", True),
    ("export --out ''", ["export", "zt.yaml", "--model", T, "--out", "", "--force"], "names no new folder", True),
    ("export --out .", ["export", "zt.yaml", "--model", T, "--out", ".", "--force"], "names no new folder", True),
    (
        "export --results missing",
        ["export", "zt.yaml", "--model", T, "--out", "x", "--results", "nope.json"],
        "nope.json",
        True,
    ),
    ("cp under /proc", ["cp", "act-paper", "/proc/x.yaml"], "/proc", True),
    ("cp unknown", ["cp", "no-such-recipe", "x.yaml"], "act-paper", True),
    (
        "calibrate --out a folder",
        ["calibrate", "zt.yaml", "--model", T, "-t", "facts-recall", "--out", "a-folder"],
        "is a folder",
        True,
    ),
    (
        "calibrate negative seed",
        ["calibrate", "zt.yaml", "--model", T, "-t", "facts-recall", "--seed", "-1"],
        "--seed -1",
        True,
    ),
    ("validate missing recipe", ["validate", "nope.yaml"], "nope.yaml", True),
    (
        "calibrate --param gammas=abc",
        ["calibrate", "zt.yaml", "--model", T, "-t", "facts-recall", "-P", "gammas=abc"],
        "--param gammas=abc",
        True,
    ),
    (
        "calibrate --param nosuch=1",
        ["calibrate", "zt.yaml", "--model", T, "-t", "facts-recall", "-P", "nosuch=1"],
        "nosuch",
        True,
    ),
    (
        "calibrate zerotuning on facts-conflict",
        ["calibrate", "zt.yaml", "--model", T, "-t", "facts-conflict"],
        "'facts-conflict' is knowledge_conflict",
        True,
    ),
    (
        "calibrate head_prune zero ablation on a classification task",
        ["calibrate", "ph3.yaml", "--model", T, "-t", "cls.yaml"],
        "head_prune with ablation: zero (PH3's search on knowledge conflicts) calibrates on a knowledge_conflict "
        "task only; 'cls.yaml' is classification",
        True,
    ),
    (
        "calibrate PH3 on the recall form of a knowledge-conflict task",
        ["calibrate", "ph3.yaml", "--model", T, "-t", "facts-recall"],
        "head_prune's search needs knowledge conflicts whose prompts state a context; 'facts-recall' is the recall",
        True,
    ),
    ("validate --model a folder without config", ["validate", "zt.yaml", "--model", "a-folder"], "config.json", True),
]
if not torch.cuda.is_available():
    CASES.append(
        (
            "cuda on a CPU-only torch",
            ["apply", "zt.yaml", "--model", T, "-p", "hi", "--device", "cuda"],
            "--device cuda",
            True,
        )
    )


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("name, args, message, cheap", CASES, ids=[c[0] for c in CASES])
def test_bad_input(work, tiny_with_tokenizer, monkeypatch, name, args, message, cheap):
    loads = []
    real = loading.load

    def spy(*a, **k):
        loads.append(a)
        return real(*a, **k)

    monkeypatch.setattr(loading, "load", spy)
    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: False)  # offline, and said at once
    before = _tree(work)
    args = [str(tiny_with_tokenizer) if a == T else a for a in args]
    result = runner.invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert [line for line in lines if line.startswith("error:")] == [lines[0]], result.output
    assert message in result.output, result.output
    assert _tree(work) == before, "a failed command left files behind"
    if cheap:
        assert not loads, "the model was loaded before a cheap check failed"
    else:
        assert loads, "the spy sees the loader (so its silence above means something)"


def test_offline_hub_id_fails_at_once(monkeypatch, work):
    monkeypatch.setattr(hub, "reachable", lambda timeout=3.0: False)
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    result = runner.invoke(app, ["validate", "zt.yaml", "--model", "someorg/some-model"])
    assert result.exit_code == 2 and "cannot be reached" in result.output
    result = runner.invoke(app, ["eval", "zt.yaml", "--model", "someorg/m", "-t", "sst2"])
    assert result.exit_code == 2 and "cannot be reached" in result.output and "--data-dir" in result.output
