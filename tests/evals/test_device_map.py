"""`--device-map` on `attnedit eval` and `attnedit apply`: a mapping file or a strategy reaches the loader;
bad values are one error line before any weight is read.

On a machine without GPUs a mapping can only name the CPU, so these tests check the option's path and its
errors; the split over two GPUs is checked by benchmarks/split_check.py.
"""

from __future__ import annotations

import json

import evalkit
import pytest
import torch
from typer.testing import CliRunner

from attnedit.cli.main import app

RECIPE = "name: zt\ninterventions: [{type: zerotuning, gamma: 3.0}, {type: head_prune, heads: {1: [0]}}]\n"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return evalkit.save_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "zt.yaml"
    path.write_text(RECIPE)
    return path


def _invoke(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def _layers(tiny_dir) -> int:
    return json.loads((tiny_dir / "config.json").read_text())["num_hidden_layers"]


def _map_file(tmp_path, tiny_dir, name="split.json", entries=None):
    """A mapping of every module of the tiny model, block by block, onto the CPU."""
    if entries is None:
        entries = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
        entries |= {f"model.layers.{i}": "cpu" for i in range(_layers(tiny_dir))}
    path = tmp_path / name
    path.write_text(json.dumps(entries))
    return path


def _figures(doc: dict) -> dict:
    """What a run measured (not when or where it ran)."""
    return {
        name: (t["n"], t["baseline"], t["patched"], t["difference"]["value"], t["difference"]["mcnemar"])
        for name, t in doc["tasks"].items()
    }


def test_eval_with_a_device_map_gives_the_same_figures(tiny_dir, toy, recipe, tmp_path):
    common = (recipe, "--model", tiny_dir, "--tasks", toy, "--limit", 8, "--bootstrap", 200)
    plain = _invoke("eval", *common, "--out", tmp_path / "plain", "--device", "cpu")
    assert plain.exit_code == 0, plain.output
    mapped = _invoke("eval", *common, "--out", tmp_path / "mapped", "--device-map", _map_file(tmp_path, tiny_dir))
    assert mapped.exit_code == 0, mapped.output
    a = json.loads((tmp_path / "plain" / "results.json").read_text())
    b = json.loads((tmp_path / "mapped" / "results.json").read_text())
    assert _figures(a) == _figures(b)
    assert "device_map" not in a and b["device_map"] and set(b["device_map"].values()) == {"cpu"}


def test_apply_with_a_yaml_device_map(tiny_dir, recipe, tmp_path):
    path = tmp_path / "split.yaml"
    path.write_text("'': cpu\n")
    args = ("apply", recipe, "--model", tiny_dir, "--prompt", "hello", "--max-new-tokens", 4, "--json", "--no-chat")
    plain = _invoke(*args, "--device", "cpu")
    mapped = _invoke(*args, "--device-map", path)
    assert plain.exit_code == 0 and mapped.exit_code == 0, plain.output + mapped.output
    assert json.loads(plain.stdout)["generations"] == json.loads(mapped.stdout)["generations"]


@pytest.mark.parametrize("command", ["eval", "apply"])
@pytest.mark.parametrize(
    "value, expected",
    [
        ("everywhere", "is neither auto, balanced, balanced_low_0, sequential nor a .json/.yaml file"),
        ("missing.json", "--device-map file missing.json does not exist"),
        ("notamap.yaml", "expected a mapping of module names to devices"),
        ("broken.json", "cannot read it as JSON or YAML"),
        ("nomodule.json", "'model.layers.99' names no module of this model; its modules: lm_head"),
        ("baddevice.json", "'gpu1' is not a device (allowed: a GPU index, cpu, cuda, cuda:N)"),
        ("unplaced.json", "places 1 weight on no device, e.g. 'lm_head.weight'"),
        ("nogpu.json", f"names GPU 7, but this machine has {torch.cuda.device_count()} GPU"),
    ],
)
def test_bad_device_maps_are_one_error_line(command, value, expected, tiny_dir, toy, recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notamap.yaml").write_text("- model.layers.0\n- cpu\n")
    (tmp_path / "broken.json").write_text('{"model": "cpu",')
    everything = {"model": "cpu", "lm_head": "cpu"}
    _map_file(tmp_path, tiny_dir, "nomodule.json", everything | {"model.layers.99": "cpu"})
    _map_file(tmp_path, tiny_dir, "baddevice.json", everything | {"model.layers.0": "gpu1"})
    _map_file(tmp_path, tiny_dir, "unplaced.json", {"model": "cpu"})
    _map_file(tmp_path, tiny_dir, "nogpu.json", everything | {"model.layers.1": 7})
    extra = ("--tasks", toy, "--out", tmp_path / "out") if command == "eval" else ("--prompt", "hi")
    res = _invoke(command, recipe, "--model", tiny_dir, *extra, "--device-map", value)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and "Traceback" not in res.output, res.output
    assert expected in " ".join(res.output.split()), res.output
    assert not (tmp_path / "out" / "results.json").exists()


def test_device_and_device_map_exclude_each_other(tiny_dir, recipe):
    res = _invoke("apply", recipe, "--model", tiny_dir, "--prompt", "hi", "--device", "cpu", "--device-map", "auto")
    assert res.exit_code == 2 and "give --device or --device-map, not both" in res.output
