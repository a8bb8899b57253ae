"""Mutated and malformed recipes: every one gives the clean error, a non-zero exit, and writes nothing."""

from __future__ import annotations

import copy
import os

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from attnedit.cli.main import app

VALID = [
    {"interventions": [{"type": "zerotuning", "gamma": 2.0, "layers": "2:", "heads": [0, 1]}]},
    {"interventions": [{"type": "act", "beta": 0.4, "tau": 0.1}]},
    {"interventions": [{"type": "pasta", "alpha": 0.01, "heads": {3: [1, 2], 5: "all"}}]},
    {"interventions": [{"type": "head_prune", "heads": {1: [0]}}]},
    {"name": "two", "interventions": [{"type": "zerotuning", "gamma": 1.5}, {"type": "act", "layers": [2, "4:6"]}]},
]

# (field, values that are never allowed there)
BAD_VALUES = {
    "gamma": [0, -1.0, "big", [], {}, None, 1e9, True, "2"],  # strict: no bool or string read as a number
    "beta": [-0.1, 1.5, "x", [0.4], None, False, "0.4"],
    "tau": [0, -0.5, 2.0, "0.1x", {}, True],
    "alpha": [0, 1.5, -2, "a"],
    "layers": ["x:y", "1:2:3", [], [-1], [1.5], {"a": 1}, 7, "every"],
    "heads": [[], [-2], ["h"], {}, {-1: [0]}, {1: []}, "some", 3.5],
    "type": ["nope", "", 3, None, ["act"]],
    "ablation": ["half", 0],
}
runner = CliRunner()


def _recipes():
    base = st.sampled_from(VALID).map(copy.deepcopy)

    def unknown_key(r, name):
        r["interventions"][0][f"x_{name}"] = 1
        return r

    def bad_value(r, pick):
        spec = r["interventions"][0]
        field = pick.draw(st.sampled_from([f for f in BAD_VALUES if f in spec or f in ("type", "layers", "heads")]))
        spec[field] = pick.draw(st.sampled_from(BAD_VALUES[field]))
        return r

    def drop_required(r):
        r["interventions"] = [{"type": "zerotuning", "heads": "all"}]  # gamma is required
        return r

    def top_level(r, name):
        r[f"unknown_{name}"] = True
        return r

    return st.one_of(
        st.builds(unknown_key, base, st.text("abcdef", min_size=1, max_size=5)),
        st.builds(lambda r, d: bad_value(r, d), base, st.data()),
        st.builds(drop_required, base),
        st.builds(top_level, base, st.text("xyz", min_size=1, max_size=4)),
        st.sampled_from([[1, 2], "just text", 42, {"interventions": "act"}, {"interventions": [7]}]),
    )


def _malformed_yaml():
    good = yaml.safe_dump(VALID[0])
    return st.one_of(
        st.integers(1, len(good) - 1).map(lambda n: good[:n] + "\n  - [unclosed"),
        st.sampled_from(
            [
                "interventions: [",
                "a: b: c",
                "\t- x",
                "interventions:\n  - type: act\n  type: act\n",
                "{{",
                "interventions: [{type: act}, {type: act}",
            ]
        ),
    )


def _check_clean_failure(text: str, tmp_path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "out.json"
    before = sorted(os.listdir(tmp_path))
    for args in (
        ["validate", str(recipe)],
        ["apply", str(recipe), "--prompt", "hi", "--out", str(out), "--model", "no/such-model"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, text, result.output)
        assert "error:" in result.output and "Traceback" not in result.output
        assert "recipe" in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit)
    assert sorted(os.listdir(tmp_path)) == before, "a failed command must write nothing"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=_recipes())
def test_mutated_recipes_fail_cleanly(data, tmp_path):
    _check_clean_failure(yaml.safe_dump(data), tmp_path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_malformed_yaml())
def test_malformed_yaml_fails_cleanly(text, tmp_path):
    _check_clean_failure(text, tmp_path)


def test_valid_recipes_pass(tmp_path):
    for data in VALID:
        path = tmp_path / "ok.yaml"
        path.write_text(yaml.safe_dump(data))
        result = runner.invoke(app, ["validate", str(path)])
        assert result.exit_code == 0, result.output
