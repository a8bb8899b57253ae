"""The Triton kernels against the PyTorch reference on the CPU, under Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before Triton is first imported, so the
checks run once in a separate process (`interpret_worker.py`) and each test
here asserts on its share of the results; nothing leaks into other test
modules. Small tiles (16 x 16) make the odd lengths span several tiles, so the
masked/unmasked phases, member-tile lists and key splits are all exercised.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import kernel_cases as kc
import pytest

pytest.importorskip("triton")
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("interpret") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "interpret_worker.py"), str(out)],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0 or not out.exists():
        pytest.fail(
            f"the interpreter worker failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return json.loads(out.read_text())


def _get(results, name):
    assert name in results, f"the worker ran no job {name}"
    r = results[name]
    assert "error" not in r, r["error"]
    return r


@pytest.mark.parametrize("spec", kc.CASES, ids=lambda s: s.name)
def test_attention_matches_reference(results, spec):
    r = _get(results, f"attention/{spec.name}")
    assert r["shape"] and r["dtype"]
    assert r["err"] < kc.TOL[spec.dtype]
    if spec.groups != "none" or spec.scale != "none" or spec.shift:
        # not vacuous: the tables move the output far beyond the tolerance
        assert r["effect"] > 5 * kc.TOL[spec.dtype]


@pytest.mark.parametrize("spec", kc.MASS_CASES, ids=lambda s: s.name)
def test_group_masses_match_reference(results, spec):
    r = _get(results, f"masses/{spec.name}")
    assert r["shape"] and r["mass_err"] < 1e-3 and r["err"] < kc.TOL[spec.dtype]


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("spec", kc.DECODE_CASES, ids=lambda s: s.name)
def test_decode_one_split_is_one_launch(results, spec, splits):
    """One key split: the decode kernel finishes the rows itself (moves, masses, scale, shift) in one launch."""
    r = _get(results, f"decode/{spec.name}/{splits}")
    assert r["shape"] and r["mass_err"] < 1e-3 and r["err"] < kc.TOL[spec.dtype]
    one = splits == 1 or spec.K <= 64  # 64 keys a tile: three splits of so few keys are one
    assert r["launches"] == (["_decode_kernel"] if one else ["_decode_kernel", "_combine_kernel"])


def test_host_driven_step_over_2048_keys_is_one_launch(results):
    """Steps launched from the host (dynamic cache) stay one launch up to 4096 keys; with the position on the
    device (static cache, CUDA graphs) 2048 keys are split and merged. Both equal plain attention."""
    r = _get(results, "split_choice")
    assert r["launches"]["host"] == ["_decode_kernel"]
    assert r["launches"]["device"] == ["_decode_kernel", "_combine_kernel"]
    assert r["err_host"] < 1e-5 and r["err_device"] < 1e-5


@pytest.mark.parametrize("spec", kc.COLSUM_CASES, ids=lambda s: s.name)
def test_column_scores_match_reference(results, spec):
    r = _get(results, f"colsum/{spec.name}")
    assert r["count_equal"]
    assert r["err"] < max(1e-4, kc.TOL[spec.dtype] / 4)


@pytest.mark.parametrize("spec", kc.BULK_CASES, ids=lambda s: s.name)
def test_bulk_epilogue_and_exact_fixup(results, spec):
    """A flash bulk corrected on the member keys; rows the edit would amplify are recomputed exactly."""
    r = _get(results, f"bulk/{spec.name}")
    assert r["err"] < kc.TOL[spec.dtype]
    assert r["in_place_equal"]  # the epilogue in the bulk's own memory gives the same rows
    if "act" in spec.name:  # sinks that hold most of a row's mass: the fixup is what makes those rows exact
        assert r["flagged"] > 0 and r["before_fixup"] > 3 * r["err"]


@pytest.mark.parametrize("spec", kc.SPLIT_CASES, ids=lambda s: s.name)
def test_split_at_image_span(results, spec):
    """Flash parts around the image span, combined with the keys before it and the sparse member keys."""
    r = _get(results, f"split/{spec.name}")
    assert r["err"] < kc.TOL[spec.dtype]
    assert r["edited"] > 10 * r["err"]  # the edit moved the output far more than the path's error
    if "overflow" in spec.name:  # more sparse keys than a list holds: every row after the span is exact
        assert r["flagged"] > 0.5


def test_member_tile_lists(results):
    assert _get(results, "member_list")["ok"]


def test_inert_tables_give_plain_attention(results):
    r = _get(results, "inert")
    assert r["inert_err"] < 1e-5 and r["live_err"] < 1e-5


def test_fallback_runs_reference_and_logs(results):
    r = _get(results, "fallback")
    assert r["equal"] and r["logged"]


@pytest.mark.parametrize("recipe", ["zerotuning", "head_prune", "act"])
def test_cached_choice_scoring_matches_reference(results, recipe):
    """Answers scored over the prompt's KV cache: a chunk of queries after the cached keys, dense padding mask."""
    r = _get(results, f"cached_choices/{recipe}")
    assert r["multi"] > 5
    assert r["err"] < 1e-4 and r["effect"] > 1e-2


@pytest.mark.parametrize("recipe", ["zerotuning", "head_prune", "act"])
def test_decoding_step_is_one_launch_per_patched_layer(results, recipe):
    """A decoding step over a short cache launches the decode kernel once per patched layer, nothing else."""
    r = _get(results, f"step_launches/{recipe}")
    assert r["layers"] > 0
    assert r["launches"] == ["_decode_kernel"] * r["layers"]


@pytest.mark.parametrize("recipe", ["zerotuning", "head_prune", "act", "pasta", "var"])
def test_decoding_plans_follow_each_input(results, recipe):
    """Per-layer decoding plans kept across steps: a second input (padded, other spans) decodes as the reference.

    The worker also runs it with the plans' invalidation switched off: the second input then goes wrong.
    """
    r = _get(results, f"decode_plans/{recipe}")
    assert r["err"] < 1e-4
    assert r["stale_err"] > 1e-2


def test_no_kernel_reads_or_writes_outside_its_tensors(results):
    """Every launch above stays inside its tensors' storages (on a GPU a stray read faults only sometimes)."""
    found = {name: r["out_of_bounds"] for name, r in results.items() if r.get("out_of_bounds")}
    assert not found, found
