"""Host time of one decoding step (dynamic KV cache), unpatched and under each method, on the CPU.

With the dynamic cache a decoding step is host-bound on a GPU (Python per layer, and each kernel
launch's argument handling): on an H200 the 32-layer Llama-3.1-8B shape spends about 0.8 ms of host
work per layer and step unpatched. This script measures that host work without a GPU: the Triton
backend runs with its kernel launches replaced by the launcher's own bookkeeping (the argument
specialisation key, which Triton's fast path computes at every launch) and a count, so what is timed
is the Python and PyTorch-dispatch work a patched step adds, layer by layer, and how many kernels
it would launch. It is a proxy for the GPU's dynamic-cache figures (`bench_generate.py`), not a
substitute: the launches themselves (about 5-20 us each on a GPU) and the device time are left out.

    python benchmarks/decode_host.py [--layers 8] [--batch 1] [--prompt 256] [--repeats 7] [--out FILE.md]

The model is `bench_generate.py`'s random Llama with the "tiny" shape (8 heads, 2 KV heads; the host
path does not depend on the width) and a 1024-token vocabulary (so that the output layer does not
drown the per-layer work), fp32; every recipe is `bench_generate.recipes` (the built-in
`zerotuning-paper`, `act-paper`, `vhr-paper`; 8 pruned heads; PASTA on a quarter of the layers; VAR
on the image stand-in). A step's time is the best, over `--repeats` rounds, of the mean of 20 steps
(the cache cut back to its length after each round); the variants alternate within a round, so a
busy machine slows them alike.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"  # the Triton backend on the CPU; set before Triton is imported

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate as bg  # noqa: E402

from attnedit.kernels import triton_common  # noqa: E402

LAUNCHES: Counter = Counter()


def _count(self, key, grid, args, consts, constexprs, num_warps, num_stages):
    """Launcher.launch without the launch (its callers have built the key): a count."""
    LAUNCHES[self.fn.__name__] += 1


def _bookkeeping_only(self, grid, args, constexprs, num_warps, num_stages=1):
    """Launcher.__call__ of versions without `Launcher.launch`: its constexpr lookup and key, a count."""
    names = self.fn.arg_names[len(args) :]
    (tuple(constexprs[n] for n in names), num_warps, num_stages, triton_common._spec_key(args))
    LAUNCHES[self.fn.__name__] += 1


class _Ops(TorchDispatchMode):
    """Counts the aten operations dispatched (each one a kernel launch or a view on a GPU)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _step(model, token, cache):
    model(input_ids=token, cache=cache, use_cache=True)


def measure(model, recipe_of: dict, names: list[str], args) -> list[dict]:
    ids, _, _ = bg.prompts(args.batch, args.prompt, "cpu")
    token = torch.full((args.batch, 1), 5)
    spans = [[(10, 40), (args.prompt, 2**62)]] * args.batch
    state = {}
    for name in names:  # prefill once per variant, keep its patch and cache
        variant = bg.Variant(model, name, recipe_of.get(name), spans if name == "pasta" else None)
        if variant.recipe is not None:
            variant.patch = bg.attnedit.patch(model, variant.recipe, backend="triton", spans=variant.spans)
        state[name] = variant
    best = {n: float("inf") for n in names}
    ops, launches = {}, {}
    with torch.no_grad():
        caches = {}
        for name in names:
            with _active(state[name]):
                out = model(input_ids=ids, use_cache=True)
                caches[name] = getattr(out, "cache", None) or out.past_key_values
                for _ in range(3):  # warm-up steps
                    _step(model, token, caches[name])
                LAUNCHES.clear()
                counter = _Ops()
                with counter:
                    _step(model, token, caches[name])
                ops[name], launches[name] = counter.n, sum(LAUNCHES.values())
        for _ in range(args.repeats):
            for name in names:
                cache = caches[name]
                with _active(state[name]):
                    t0 = time.perf_counter()
                    for _ in range(20):
                        _step(model, token, cache)
                    best[name] = min(best[name], (time.perf_counter() - t0) / 20 * 1e3)
                cache.crop(-20)  # back to its length (a negative length removes that many tokens)
    base = best[names[0]]
    return [
        dict(variant=n, ms=best[n], ratio=best[n] / base, ops=ops[n], launches=launches[n], layers=args.layers)
        for n in names
    ]


class _active:
    """Put the model in a variant for a block: its patch applied (the prefill's per-input state stays in the
    patch), or eager attention for the unpatched eager variant."""

    def __init__(self, variant):
        self.v = variant

    def __enter__(self):
        if self.v.name == "eager":
            self.v.model.set_attn_implementation("eager")
        elif self.v.patch is not None:
            self.v.patch.apply()
        return self

    def __exit__(self, *exc):
        if self.v.patch is not None:
            self.v.patch.remove()
        if self.v.name == "eager":
            self.v.model.set_attn_implementation("sdpa")


def table(rows: list[dict]) -> str:
    lines = [
        "| variant | ms / step | x unpatched | host ms / layer over unpatched | aten ops / step "
        "| kernel launches / step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    base = rows[0]["ms"]
    for r in rows:
        extra = (r["ms"] - base) / r["layers"]
        lines.append(
            f"| {r['variant']} | {r['ms']:.2f} | {r['ratio']:.2f} | {extra:+.3f} | {r['ops']} | {r['launches']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="decoder layers (at least 4: the recipes edit layers 2..)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=256, help="prompt tokens, at least 64 (below 1024: one key split)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (the best counts)")
    ap.add_argument("--variants", type=bg.names, default=["sdpa", "zerotuning", "act", "head_prune", "pasta", "var"])
    ap.add_argument("--out", type=Path, help="also write the table (with the command) to this markdown file")
    args = ap.parse_args()
    if args.variants[0] != "sdpa":
        raise SystemExit("error: --variants must start with sdpa (the unpatched baseline)")
    for name, value, least in (("--layers", args.layers, 4), ("--batch", args.batch, 1), ("--prompt", args.prompt, 64)):
        if value < least:
            raise SystemExit(f"error: {name} must be at least {least}, got {value}")
    if args.repeats < 1:
        raise SystemExit(f"error: --repeats must be at least 1, got {args.repeats}")
    if args.out and not args.out.parent.is_dir():
        raise SystemExit(f"error: --out {args.out}: the folder {args.out.parent} does not exist")
    if hasattr(triton_common.Launcher, "launch"):  # every launch ends there, its key built by the caller
        triton_common.Launcher.launch = _count
    else:
        triton_common.Launcher.__call__ = _bookkeeping_only
    torch.set_num_threads(1)
    # a small vocabulary, so the output layer does not drown the per-layer work; the stand-in image token
    # (VAR, VHR) is its last id
    bg.SHAPES["host"] = dict(bg.SHAPES["tiny"], vocab_size=1024)
    bg.IMAGE_ID = 1023
    model = bg.build_model("host", args.layers, torch.float32, "cpu")
    recipe_of = bg.recipes(args.layers, model.config.num_attention_heads, model.config.hidden_size)
    rows = measure(model, recipe_of, args.variants, args)
    head = (
        f"`python {' '.join(sys.argv)}`\n\n{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"transformers {bg.transformers.__version__}, Python {platform.python_version()}; batch {args.batch}, "
        f"{args.prompt}-token prompt, {args.layers} layers, best of {args.repeats} rounds of 20 steps\n"
    )
    text = head + "\n" + table(rows) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
