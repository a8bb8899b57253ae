"""The benchmark scripts run (a smoke run on the CPU; their figures come from the real runs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_decode_host_benchmark_prints_its_table(tmp_path):
    """`benchmarks/decode_host.py` on a 4-layer model: a row per variant, one launch per patched layer."""
    pytest.importorskip("triton")
    out = tmp_path / "host.md"
    argv = [sys.executable, "benchmarks/decode_host.py", "--layers", "4", "--prompt", "64", "--repeats", "1"]
    argv += ["--variants", "sdpa,zerotuning,head_prune", "--out", str(out)]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.read_text().splitlines() if line[:2] == "| "}
    assert set(rows) >= {"sdpa", "zerotuning", "head_prune"}
    assert rows["sdpa"][3].strip() == "1.00" and rows["sdpa"][6].strip() == "0"
    assert rows["zerotuning"][6].strip() == "4"  # every layer patched, one decode kernel each (short cache)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--variants", "zerotuning"], "--variants must start with sdpa"),
        (["--layers", "2"], "--layers must be at least 4"),
        (["--out", "no/such/folder/host.md"], "does not exist"),
    ],
)
def test_decode_host_benchmark_refuses_bad_options(extra, message):
    done = subprocess.run(
        [sys.executable, "benchmarks/decode_host.py", *extra], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr


def test_generate_benchmark_times_dynamic_variants_in_rounds(tmp_path):
    """`benchmarks/bench_generate.py` on a tiny CPU model: every dynamic-cache variant timed once per round,
    each round's ratio to that round's unpatched SDPA kept, the best round as the figure."""
    import json

    argv = [sys.executable, "benchmarks/bench_generate.py", "--shape", "tiny", "--layers", "2", "--new-tokens", "10"]
    argv += ["--batches", "1x32", "--modes", "dynamic", "--e2e-tokens", "0", "--reps", "3"]
    argv += ["--variants", "sdpa,zerotuning", "--out", str(tmp_path), "--tag", "gen"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dynamic round 3: sdpa" in done.stderr
    rows = {r["variant"]: r for r in json.loads((tmp_path / "gen.json").read_text())["generate"]}
    for name in ("sdpa", "zerotuning"):
        r = rows[name]
        assert len(r["rounds"]) == 3 and r["ms_per_token"] == min(r["rounds"])
        base = rows["sdpa"]["rounds"]
        assert r["round_ratios"] == pytest.approx([x / b for x, b in zip(r["rounds"], base)])
        assert r["median_round_ratio"] == pytest.approx(sorted(r["round_ratios"])[1])
        # each round's median interval between decoding steps (10 new tokens: 9 intervals), the best one kept
        assert len(r["step_medians"]) == 3 and all(0 < x < 1e4 for x in r["step_medians"])
        assert r["step_median_ms"] == min(r["step_medians"])
        ratios = [x / b for x, b in zip(r["step_medians"], rows["sdpa"]["step_medians"])]
        assert r["step_median_ratio"] == pytest.approx(sorted(ratios)[1])
    assert rows["sdpa"]["ratio"] == 1.0 and rows["sdpa"]["step_median_ratio"] == 1.0
    median = sorted(rows["zerotuning"]["round_ratios"])[1]
    text = (tmp_path / "gen.md").read_text()
    assert "rounds: x unpatched in each, range and median" in text and f"median {median:.2f} (3)" in text
    assert "median step: ms, best round" in text


def test_step_clock_keeps_the_median_interval_between_steps(monkeypatch):
    """A burst of slow steps moves the mean interval but not the median the generation benchmark reads."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_generate

    clock = bench_generate.StepClock()
    assert clock.median_ms() is None
    clock.stamps = [0.0, 0.010, 0.020, 0.030, 0.130, 0.140]  # one step of 100 ms among 10 ms ones
    assert clock.median_ms() == pytest.approx(10.0)
    scores = torch.zeros(1, 4)
    assert clock(torch.zeros(1, 2, dtype=torch.long), scores) is scores and len(clock.stamps) == 7


def test_abba_quads_cancel_a_linear_drift(monkeypatch):
    """`--abba`: SDPA, variant, variant, SDPA; a machine slowing down linearly from call to call leaves each
    quad's ratio at the variant's true cost (an SDPA, variant, SDPA, variant order would not)."""
    import argparse
    import contextlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_generate as bg

    calls, current = [], {}

    @contextlib.contextmanager
    def variant(model, name, recipe=None, spans=None):
        current["name"] = name
        yield

    def generate(model, ids, new, static, clock=None):  # every call 10% slower than the one before
        step = 0.010 * (1 + 0.1 * len(calls)) * (1.2 if current["name"] != "sdpa" else 1.0)
        calls.append(current["name"])
        clock.stamps = [i * step for i in range(new)]

    monkeypatch.setattr(bg, "Variant", variant)
    monkeypatch.setattr(bg, "generate", generate)
    args = argparse.Namespace(abba=3, abba_tokens=8, device="cpu")
    rows = [
        {"batch": 1, "prompt": 64, "variant": "sdpa", "ms_per_token": 1.0},
        {"batch": 1, "prompt": 64, "variant": "zerotuning", "ms_per_token": 1.2},
        {"batch": 1, "prompt": 64, "variant": "pasta", "ms_per_token": None},  # failed in the rounds: skipped
        {"batch": 16, "prompt": 64, "variant": "act", "ms_per_token": 1.0},  # another configuration
    ]
    bg.measure_abba(None, args, {}, 1, 64, rows, lambda: False)
    assert calls == ["sdpa", "zerotuning", "zerotuning", "sdpa"] * 3
    zt = rows[1]
    assert zt["abba_ratios"] == pytest.approx([1.2] * 3) and zt["abba_ratio"] == pytest.approx(1.2)
    assert zt["abba_iqr"] == pytest.approx([1.2, 1.2])
    assert not any("abba_ratios" in r for r in (rows[0], rows[2], rows[3]))

    def broken(model, ids, new, static, clock=None):
        raise RuntimeError("kernel fault\nmore")

    monkeypatch.setattr(bg, "generate", broken)
    failing = [{"batch": 1, "prompt": 64, "variant": "act", "ms_per_token": 1.0}, dict(rows[1], abba_ratios=None)]
    bg.measure_abba(None, args, {}, 1, 64, failing, lambda: False)  # recorded on each row, no exception
    assert failing[0]["abba_error"] == "RuntimeError: kernel fault" and "abba_ratios" not in failing[0]
    assert failing[1]["abba_error"] == "RuntimeError: kernel fault" and failing[1]["abba_ratios"] is None
    failing[0].update(mode="dynamic", ratio=1.0, ratio_to_dynamic=1.0)
    table = bg.tables([failing[0]], [], argparse.Namespace(abba_tokens=8, e2e_tokens=0))
    assert "| 1 x 64 | act | fails: RuntimeError: kernel fault | | |" in table
    table = bg.tables([], [], argparse.Namespace(abba_tokens=8, e2e_tokens=0))
    assert "ABBA" not in table  # no quads, no second table
    zt.update(mode="dynamic", ratio=1.2, ratio_to_dynamic=1.2)
    table = bg.tables([zt], [], argparse.Namespace(abba_tokens=8, e2e_tokens=0))
    assert "| 1 x 64 | zerotuning | 3 | 1.200 | 1.200-1.200 |" in table


def test_stand_in_plants_four_sinks_that_var_finds(monkeypatch):
    """The benchmark model's prefills carry massive activations at the first token and three image tokens,
    in every variant; VAR's detection (the benchmark's recipe) flags exactly those in each of its layers,
    and a decoding step runs on as before."""
    import torch

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_generate as bg

    model = bg.build_model("tiny", 5, torch.float32, "cpu")
    recipe = bg.recipes(5, model.config.num_attention_heads, model.config.hidden_size)["var"]
    ids, start, n = bg.prompts(1, 256, "cpu")
    planted = bg.sink_positions(256)
    assert planted[0] == 0 and all(start <= p < start + n for p in planted[1:])
    patch = bg.attnedit.patch(model, recipe, backend="reference").apply()
    try:
        with torch.no_grad():
            out = model(ids, use_cache=True)
            found = {layer: torch.nonzero(buf[0, :256]).flatten().tolist() for layer, buf in patch.state.hsink.items()}
            step = model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits
    finally:
        patch.remove()
    assert sorted(found) == [2, 3] and all(f == planted for f in found.values())
    assert torch.isfinite(step).all()
    seen = []

    def grab(module, args, kwargs):
        seen.append(args[0] if args else kwargs["hidden_states"])

    hook = model.model.layers[1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids[:, :80])
    finally:
        hook.remove()
    x = seen[0][0].float()
    xhat = x.abs() / x.pow(2).mean(-1, keepdim=True).sqrt()
    assert (xhat[bg.sink_positions(80), 0] > 8).all() and xhat[1, 0] < 8  # planted in the layer's input


def test_prefill_rows_time_vhr_with_its_heads_given(monkeypatch):
    """The end-to-end prefill times every variant, VHR twice (as the paper runs it, with no runtime target but
    its floor, and with its heads given, target 0.98); the table says which is which."""
    import argparse

    import torch
    import triton.testing

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_generate as bg

    def bench(fn, **kw):
        fn()
        return 1.0

    monkeypatch.setattr(triton.testing, "do_bench", bench)
    model = bg.build_model("tiny", 4, torch.float32, "cpu")
    recipe_of = bg.recipes(4, model.config.num_attention_heads, model.config.hidden_size)
    args = argparse.Namespace(e2e_tokens=128, device="cpu", variants=list(bg.VARIANTS), abba_tokens=8)
    rows = bg.run_prefill(model, args, recipe_of)
    names = [r["variant"] for r in rows]
    assert names == ["sdpa", "zerotuning", "act", "head_prune", "pasta", "vhr", "vhr_heads", "var"]
    assert not [r for r in rows if r.get("error")], rows
    by = {r["variant"]: r for r in rows}
    assert by["vhr"]["target"] is None and by["vhr"]["floor"] == pytest.approx(128 / (256 - 64))
    assert by["vhr_heads"]["target"] == 0.98 and by["act"]["target"] == 0.90
    table = bg.tables([], rows, args)
    assert "| vhr | 1.0 |" in table and "none: two prefills per input" in table
    assert "| vhr_heads | 1.0 | 128000 | 1.000 | >= 0.98: met |" in table


@pytest.mark.parametrize(
    "script, extra, message",
    [
        ("bench_generate.py", ["--reps", "0"], "--reps must be at least 1"),
        ("bench_generate.py", ["--batches", "1x0"], "batch and prompt length must be at least 1"),
        ("bench_generate.py", ["--batches", "1xab"], "is not BATCHxPROMPT"),
        ("bench_generate.py", ["--variants", "sdpa,nosuch"], "unknown variants"),
        ("bench_generate.py", ["--abba", "-1"], "--abba must be 0 (off) or more"),
        ("bench_generate.py", ["--abba", "2", "--abba-tokens", "2"], "--abba-tokens must be at least 3"),
        ("bench_generate.py", ["--abba", "2", "--variants", "zerotuning"], "include sdpa in --variants"),
        ("bench_generate.py", ["--abba", "2", "--modes", "static"], "include dynamic in --modes"),
        ("profile_generate.py", ["--batch", "0"], "--batch must be at least 1"),
        ("profile_generate.py", ["--variants", "nosuch"], "unknown variants"),
        ("profile_generate.py", ["--static", "--top", "0"], "--top must be at least 1"),
        ("profile_generate.py", ["--prefill", "-1"], "--prefill must be a token count"),
        ("decode_layer.py", ["--batch", "0"], "--batch must be at least 1"),
        ("decode_layer.py", ["--keys", "1"], "--keys must be at least 2"),
        ("decode_layer.py", ["--variants", "sdpa,nosuch"], "unknown variants"),
        ("decode_layer.py", ["--variants", "sdpa,eager"], "eager is not an attention call"),
    ],
)
def test_generation_benchmarks_refuse_bad_options(script, extra, message):
    done = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--shape", "tiny", *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr


def test_static_profile_without_a_gpu_says_so():
    """`profile_generate.py --static` lists CUDA kernels; on a machine without CUDA it stops with one message
    instead of printing empty tables."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the message is for machines without CUDA")
    argv = [sys.executable, "benchmarks/profile_generate.py", "--static", "--shape", "tiny", "--layers", "2"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "--static" in done.stderr and "needs a CUDA GPU" in done.stderr
    assert "Traceback" not in done.stderr


def test_layer_host_benchmark_without_a_gpu_says_so():
    """`decode_layer.py` times CUDA launches; without CUDA it stops with one message before building a model."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the message is for machines without CUDA")
    done = subprocess.run(
        [sys.executable, "benchmarks/decode_layer.py", "--shape", "tiny"], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("extra", [[], ["--sweep-bulk"]])
def test_attention_benchmark_without_a_gpu_says_so(extra):
    """`bench_attention.py` (every mode, the bulk-epilogue sweep too) stops with one message without CUDA."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the message is for machines without CUDA")
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_attention.py", *extra], cwd=ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr and "Traceback" not in done.stderr


def test_evidence_script_defines_every_lane_it_runs():
    """`benchmarks/evidence/gpu.sh` parses, and every lane of its default list (and of the README's
    `LANES=...` commands) is a function it defines: a misspelt lane would only fail on the GPU."""
    script = ROOT / "benchmarks" / "evidence" / "gpu.sh"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    text = script.read_text()
    defined = set(re.findall(r"^lane_(\w+)\(\)", text, flags=re.M))
    default = re.search(r'^LANES=\$\{LANES:-"([^"]*)"\}', text, flags=re.M)
    assert default, "gpu.sh sets its default LANES"
    named = [lane.split(":")[0] for lane in default.group(1).split()]
    docs = "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
    for run in re.findall(r'LANES="([^"]*)"[^`\n]*gpu\.sh', docs + text):
        named += [lane.split(":")[0] for lane in run.split()]
    missing = sorted({n for n in named if n not in defined})
    assert not missing, f"lanes named but not defined in gpu.sh: {missing} (defined: {sorted(defined)})"


def test_evidence_script_refuses_an_unknown_lane_before_doing_anything(tmp_path):
    out = tmp_path / "ev"
    env = {**os.environ, "LANES": "colored nosuch:3", "R": str(out)}
    done = subprocess.run(
        ["bash", "benchmarks/evidence/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "unknown lane 'nosuch:3'" in done.stderr and "colored_lp" in done.stderr
    assert not out.exists()  # nothing written, the model not loaded
