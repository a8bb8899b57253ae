"""Where the host time of a dynamic-cache decoding step goes, unpatched and under a patch (diagnosis).

Builds `bench_generate.py`'s random model, warms each variant with one `generate`, then runs one
`generate` under cProfile and prints, per variant, the total time and the cumulative time per call
of the functions that differ between an unpatched and a patched step: transformers' SDPA attention
function, the patch's attention function, the decoding launch path (`Decoder`, launch templates,
Triton's compiled-kernel runner). cProfile slows Python functions more than C calls, so read the
per-call times as relative, not as what a step costs unprofiled (`bench_generate.py` measures that).
Then, per variant, one `generate` under torch.profiler (`--torch-profile N` new tokens): how many
host synchronisations it made, its device time, and the attention kernels' launches and mean time.
With `--static`: the static cache as transformers compiles it; each variant's decoding step is compiled
by one warm-up `generate`, then one `generate` runs under torch.profiler and the kernels with the most
device time are listed (what a CUDA-graph replay of the step spends its time on).

    python benchmarks/profile_generate.py [--variants sdpa,zerotuning,head_prune] [--batch 1] [--prompt 2048]
        [--new-tokens 24] [--layers 32] [--shape llama3.1-8b] [--torch-profile 16] [--out DIR]
    python benchmarks/profile_generate.py --static [--variants sdpa,zerotuning,var] [--top 12] ...
        (with --out: each variant's full cProfile listing, sorted by own time and by cumulative time)
    python benchmarks/profile_generate.py --prefill 8192 [--variants sdpa,var,act] [--top 12]
        (one prefill of that many tokens per variant, as `bench_generate.py --e2e-tokens` times it:
        wall time, host syncs, device time and the kernels with the most of it)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate as bg  # noqa: E402

WATCH = (
    ("sdpa_attention.py", "sdpa_attention_forward", "transformers SDPA attention"),
    ("core/patch.py", "_attention", "attnedit attention (patched layers)"),
    ("triton_decode.py", "__call__", "Decoder step (launch set-up + launches)"),
    ("triton_common.py", "launch", "Launcher.launch (per kernel launch)"),
    ("compiler.py", "runner", "Triton compiled-kernel runner (per launch)"),
    ("runtime.py", "layer_tables", "runtime.layer_tables (per layer)"),
)


def torch_summary(model, ids, name: str, recipe_of: dict, spans, new_tokens: int) -> str:
    """One line per variant from torch.profiler: host synchronisations, device time, attention kernels."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415  (this mode only)

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with bg.Variant(model, name, recipe_of.get(name), spans):
        with profile(activities=acts) as prof:
            bg.generate(model, ids, new_tokens, False)
            bg.sync()
    syncs, device_us, kernels = 0, 0.0, {}
    for e in prof.key_averages():
        if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"):
            syncs += e.count
        device_us += getattr(e, "self_device_time_total", 0.0)
        if any(k in e.key for k in ("_decode_kernel", "_combine_kernel", "flash", "sdpa")) and e.count:
            kernels[e.key[:40]] = (e.count, getattr(e, "self_device_time_total", 0.0) / e.count)
    parts = ", ".join(f"{k} {n} x {us:.1f} us" for k, (n, us) in sorted(kernels.items()))
    line = f"- {name}, generate({new_tokens}): {syncs} host syncs, device time {device_us / 1e3:.1f} ms"
    return line + (f"; {parts}" if parts else "")


def _top_kernels(prof, top: int) -> tuple[float, int, list[str]]:
    """(device ms, kernel launches, table lines of the `top` kernels with the most device time) of a profile."""
    rows = [e for e in prof.key_averages() if str(e.device_type).endswith("CUDA") and e.self_device_time_total > 0]
    total = sum(e.self_device_time_total for e in rows)
    rows.sort(key=lambda e: -e.self_device_time_total)
    lines = ["| kernel | launches | us each | ms total |", "|---|---:|---:|---:|"]
    for e in rows[:top]:
        us = e.self_device_time_total
        lines.append(f"| {e.key[:70]} | {e.count} | {us / e.count:.1f} | {us / 1e3:.2f} |")
    return total / 1e3, sum(e.count for e in rows), lines


def static_kernels(model, ids, name: str, recipe, spans, new_tokens: int, top: int) -> str:
    """The kernels with the most device time in one static-cache `generate` (decoding steps compiled and graphed)."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415  (this mode only)

    torch._dynamo.reset()
    with bg.Variant(model, name, recipe, spans):
        bg.generate(model, ids, new_tokens, True)  # compiles the decoding step
        bg.sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            bg.generate(model, ids, new_tokens, True)
            bg.sync()
    ms, n, table = _top_kernels(prof, top)
    return "\n".join([f"\n{name}, static generate({new_tokens}): device time {ms:.2f} ms, {n} kernels", *table])


def prefill_kernels(model, length: int, device: str, name: str, recipe, top: int) -> str:
    """One prefill as `bench_generate.py` times it, under torch.profiler: wall ms, host syncs, top kernels."""
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415  (this mode only)

    fwd, spans = bg.prefill_call(model, length, device)
    with bg.Variant(model, name, recipe, spans if name == "pasta" else None):
        for _ in range(3):
            fwd()
        bg.sync()
        t0 = time.perf_counter()
        fwd()
        bg.sync()
        wall = (time.perf_counter() - t0) * 1e3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fwd()
            bg.sync()
    syncs = sum(e.count for e in prof.key_averages() if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize"))
    ms, n, table = _top_kernels(prof, top)
    head = f"\n{name}, prefill of {length} tokens: wall {wall:.1f} ms (unprofiled), device time {ms:.2f} ms, "
    return "\n".join([head + f"{n} kernels, {syncs} host syncs", *table])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", type=bg.names, default=["sdpa", "zerotuning", "head_prune"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shape", choices=bg.SHAPES, default="llama3.1-8b")
    ap.add_argument("--out", type=Path, help="folder for each variant's full cProfile listing")
    ap.add_argument(
        "--torch-profile",
        type=int,
        default=16,
        metavar="N",
        help="also run generate(N) under torch.profiler: host syncs, device time, the decode kernels' time (0: skip)",
    )
    ap.add_argument("--static", action="store_true", help="the static cache, compiled: each variant's top kernels")
    ap.add_argument("--top", type=int, default=12, help="--static, --prefill: kernels listed per variant")
    ap.add_argument("--prefill", type=int, default=0, metavar="N", help="profile one N-token prefill per variant")
    args = ap.parse_args()
    for name, n in (("--batch", args.batch), ("--prompt", args.prompt), ("--new-tokens", args.new_tokens)):
        if n < 1:
            raise SystemExit(f"error: {name} must be at least 1 (got {n})")
    if args.top < 1:
        raise SystemExit(f"error: --top must be at least 1 (got {args.top})")
    if args.prefill < 0:
        raise SystemExit(f"error: --prefill must be a token count (got {args.prefill})")
    if (args.static or args.prefill) and not torch.cuda.is_available():
        raise SystemExit("error: --static and --prefill list CUDA kernels: each needs a CUDA GPU")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(bg.device_line(), flush=True)
    model = bg.build_model(args.shape, args.layers, dtype, device)
    recipe_of = bg.recipes(args.layers, model.config.num_attention_heads, model.config.hidden_size)
    ids, _, _ = bg.prompts(args.batch, args.prompt, device)
    spans = [[(100, 196), (args.prompt, 2**62)]] * args.batch
    if args.prefill:
        for name in args.variants:
            print(prefill_kernels(model, args.prefill, device, name, recipe_of.get(name), args.top), flush=True)
        return
    print(f"\nbatch {args.batch}, {args.prompt}-token prompt, {args.new_tokens} new tokens, {args.layers} layers")
    if args.static:
        torch._dynamo.config.cache_size_limit = 64
        for name in args.variants:
            sp = spans if name == "pasta" else None
            print(static_kernels(model, ids, name, recipe_of.get(name), sp, args.new_tokens, args.top), flush=True)
        return
    print("\n| variant | generate s (profiled) | function | calls | cumulative us / call |")
    print("|---|---:|---|---:|---:|")
    summaries = []
    for name in args.variants:
        with bg.Variant(model, name, recipe_of.get(name), spans if name == "pasta" else None):
            bg.generate(model, ids, args.new_tokens, False)
            prof = cProfile.Profile()
            prof.enable()
            bg.generate(model, ids, args.new_tokens, False)
            bg.sync()
            prof.disable()
        stats = pstats.Stats(prof)
        total = stats.total_tt
        for (file, _line, func), (_cc, ncalls, _tt, ct, _callers) in sorted(stats.stats.items()):
            for part, fn, label in WATCH:
                if file.endswith(part) and func == fn:
                    print(f"| {name} | {total:.3f} | {label} | {ncalls} | {ct / ncalls * 1e6:.1f} |")
        if args.torch_profile:
            summaries.append(
                torch_summary(model, ids, name, recipe_of, spans if name == "pasta" else None, args.torch_profile)
            )
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            text = io.StringIO()
            pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
            pstats.Stats(prof, stream=text).sort_stats("cumtime").print_stats(60)
            (args.out / f"cprofile-{name}.txt").write_text(text.getvalue())

    if summaries:
        print("\ntorch.profiler:\n" + "\n".join(summaries))


if __name__ == "__main__":
    main()
