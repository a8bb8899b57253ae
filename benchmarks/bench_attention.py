"""Attention benchmark: SDPA, FlexAttention, eager and the attnedit kernels, one run, ratios to SDPA.

Prefill at 1k-32k tokens and decode over 4k/32k KV, in Llama-3.1-8B attention
shape (32 query heads, 8 KV heads, head_dim 128) and SmolLM2 shape (9 / 3 / 64),
bf16, one sequence, random inputs with a few strong "sink" keys so that ACT's
detection finds sinks as it would on a real model. Times are medians of
`triton.testing.do_bench`; peak memory is `torch.cuda.max_memory_allocated`
during one call, over what the inputs already hold.

Each method's tables come from a real recipe (`RECIPES`, YAML text) compiled by `attnedit.patch` for a
one-layer model of the attention shape and built for one forward by attnedit's runtime, as the patch
builds them for a layer: nothing here writes a key group, a bias or a move by hand. The timed call is
the kernel on those tables (ACT "+detection": the runtime's table building with the column scores and
the detection inside, as at a prefill).

    python benchmarks/bench_attention.py --out benchmarks/results          # the full table
    python benchmarks/bench_attention.py --sweep                            # tile shapes of the fused kernel
    python benchmarks/bench_attention.py --e2e --out benchmarks/results     # 8k prefill of a Llama-3.1-8B-shaped model
"""

from __future__ import annotations

import argparse
import cProfile
import json
import math
import platform
import pstats
import sys
import time
from pathlib import Path

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import AutoConfig, AutoModelForCausalLM
from triton.testing import do_bench

import attnedit
from attnedit import runtime
from attnedit.kernels import reference, triton_colsum, triton_decode, triton_ops, triton_prefill
from attnedit.tables import MaskInfo

SHAPES = {"llama3.1-8b": (32, 8, 128), "smollm2": (9, 3, 64)}
LOG = math.log


def device_line() -> str:
    p = torch.cuda.get_device_properties(0)
    return (
        f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
        f"triton {triton.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}"
    )


def sink_keys(N: int) -> list[int]:
    return [0, 37 % N, N // 3, N // 2 + 5]


def inputs(H: int, Hkv: int, D: int, N: int, Q: int | None = None, seed: int = 0):
    """q (1, H, Q, D) as a view of (1, Q, H, D) memory, k/v (1, Hkv, N, D), as transformers passes them.

    Attention sinks as in trained models: the first key takes about 40% of a late row's mass and
    three more keys about 12% each, at every length (their logits grow like log N).
    """
    Q = N if Q is None else Q
    g = torch.Generator(device="cuda").manual_seed(seed)
    u = torch.randn(1, 1, H, D, device="cuda", generator=g)  # a direction every query shares a little of
    q = (torch.randn(1, Q, H, D, device="cuda", generator=g) + 0.5 * u).to(torch.bfloat16)
    k = torch.randn(1, N, Hkv, D, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, N, Hkv, D, device="cuda", generator=g, dtype=torch.bfloat16)
    rest = math.log(N) + 0.625  # log sum_j e^{s_j} of the ordinary keys (logit variance ~1.25)
    for key, share in zip(sink_keys(N), (0.40, 0.12, 0.12, 0.12)):
        logit = rest + math.log(share / 0.24)  # the ordinary keys keep 24%
        k[:, key] += (2 * logit / D**0.5 * u[0, 0, :: H // Hkv]).to(k.dtype)  # q.k/sqrt(D) = 0.5 c |u|^2 / sqrt(D)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def causal(N: int, Q: int | None = None) -> MaskInfo:
    Q = N if Q is None else Q
    return MaskInfo(None, N - Q, 0, None, torch.zeros(1, dtype=torch.long, device="cuda"))


# --------------------------------------------------------------------------- tables from recipes

# Each method's recipe, with the settings this benchmark has always measured.
RECIPES = {
    "zerotuning": "name: bench-zerotuning\ninterventions: [{type: zerotuning, gamma: 3.5}]\n",
    "pasta": "name: bench-pasta\ninterventions: [{type: pasta, alpha: 0.01}]\n",
    "head_prune": "name: bench-head-prune\ninterventions: [{type: head_prune, heads: {0: [0, 5, 7, 8]}}]\n",
    "act": "name: bench-act\ninterventions: [{type: act, beta: 0.4, tau: 0.1, layers: all}]\n",
    # VAR's defaults (p 0.6, rho 0.5, image mass floor 0.2); its sinks are given below, not searched
    "var": "name: bench-var\ninterventions: [{type: var, layers: all, p: 0.6, rho: 0.5, min_image_mass: 0.2, "
    "sink_dims: [0]}]\n",
}
IMAGE_ID = 15  # the image token of the one-layer stand-in model


def one_layer(H: int, Hkv: int, D: int):
    """A one-layer Llama model of the attention shape on the meta device (no memory): what a patch compiles for."""
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=H * D,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=H,
        num_key_value_heads=Hkv,
        head_dim=D,
        vocab_size=IMAGE_ID + 1,
    )
    cfg.image_token_id = IMAGE_ID  # VAR needs an image token
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


class Method:
    """One method's recipe, compiled by `attnedit.patch` for a one-layer model of the attention shape.

    `begin` and `tables` build one forward's tables through attnedit's runtime, as the patch does for
    a layer: at a prefill of N tokens, or at a decoding step over N keys after a prefill of N - 1.
    Per-input inputs are the ones earlier versions of this benchmark wrote by hand: PASTA's span
    (96 tokens from N/4), VAR's image (576 tokens from position 35, at most N/2) with a text sink at
    key 0 and three image sinks, ACT's detected sinks (or sink_keys(N)[1:] for a decoding step).
    """

    def __init__(self, shape: str, method: str, device="cuda"):
        H, Hkv, D = SHAPES[shape]
        self.H, self.device = H, torch.device(device)
        recipe = attnedit.Recipe.from_str(RECIPES[method], f"bench-{method}.yaml")
        self.patch = attnedit.patch(one_layer(H, Hkv, D), recipe, backend="triton")
        self.plan = runtime.plan_on({}, self.patch.compiled.layers[0], self.device)
        self.method = method

    def image(self, N: int) -> tuple[int, int]:
        return min(35, N // 8), min(576, N // 2)

    def begin(self, N: int, Q: int, total: int | None = None):
        """The runtime's `Forward` of Q tokens ending at N (Q == N: a prefill) of an input of `total` tokens."""
        past, ids, spans = N - Q, None, None
        lo, n = self.image(total or N)
        if self.method == "var":
            ids = torch.zeros(1, N, dtype=torch.long, device=self.device)
            ids[:, lo : lo + n] = IMAGE_ID
            ids = ids[:, past:]
        if self.method == "pasta":
            spans = torch.tensor([[[N // 4, N // 4 + 96]]], device=self.device)
        fwd = runtime.begin(
            self.patch.state,
            self.patch.compiled,
            batch=1,
            length=Q,
            device=self.device,
            past=past,
            capacity=N,
            detect=past == 0,
            attention_mask=None,
            input_ids=ids,
            spans=spans,
        )
        if self.method == "var":  # the hidden-state sinks a layer pre-hook would have found
            found = torch.zeros(1, N, dtype=torch.bool, device=self.device)
            found[:, [0, lo + 3, lo + 100 % n, lo + n // 2]] = past == 0
            runtime.record_layer_detection(fwd, 0, found[:, past:])
        return fwd

    def tables(self, fwd, N: int, detect=None):
        """One layer's tables over N keys; `detect(pre_tables) -> (1, H, N) bool` at a prefill with ACT."""
        return runtime.layer_tables(
            self.plan, fwd, 0, device=self.device, heads=self.H, k_len=N, kv_offset=0, detect_sinks=detect
        )

    def prefill(self, N: int, detect=None):
        return self.tables(self.begin(N, N), N, detect)

    def decode(self, N: int):
        """Tables of a decoding step over N keys, after a prefill of N - 1 tokens (ACT: sinks at sink_keys)."""
        sinks = torch.zeros(1, self.H, N - 1, dtype=torch.bool, device=self.device)
        sinks[:, :, sink_keys(N)[1:]] = True
        self.tables(self.begin(N - 1, N - 1, N), N - 1, (lambda pre: sinks) if self.method == "act" else None)
        return self.tables(self.begin(N, 1), N)

    def detector(self, q, k, v, mask, scaling, keep: dict | None = None):
        """ACT's detection as the patch runs it at a prefill: column scores, then the compiled detectors."""

        def detect(pre):
            if keep is not None:
                keep["pre"] = pre
            colsum, count = triton_ops.column_scores(q, k, pre, mask, scaling=scaling, value=v)
            found = torch.zeros(colsum.shape, dtype=torch.bool, device=colsum.device)
            for det in self.plan.attention_detectors:
                found |= det.detect(colsum, count, pre.first_key)
            return found

        return detect


def methods(shape: str) -> dict[str, Method]:
    return {name: Method(shape, name) for name in RECIPES}


def act_full(m: Method, fwd, q, k, v, mask, scaling, N):
    """ACT as the patch runs it at prefill: column scores, detection, then attention with the sinks."""
    tables = m.tables(fwd, N, m.detector(q, k, v, mask, scaling))
    return triton_ops.attention(q, k, v, tables, mask, scaling=scaling)


# --------------------------------------------------------------------------- baselines


def flex_fns(H, Hkv, N, Q):
    """FlexAttention with the ZeroTuning (key-0) and PASTA (span) score_mods, compiled once per shape."""
    flex = torch.compile(flex_attention, dynamic=False)
    off = N - Q
    block = create_block_mask(lambda b, h, qi, ki: ki <= qi + off, 1, 1, Q, N, device="cuda")
    zt_bias = LOG(3.5)
    lo = N // 4

    def zt(score, b, h, qi, ki):
        return score + torch.where(ki == 0, zt_bias, 0.0)

    def pa(score, b, h, qi, ki):
        return score + torch.where((ki >= lo) & (ki < lo + 96), 0.0, LOG(0.01))

    return {
        "flex zerotuning": lambda q, k, v: flex(q, k, v, score_mod=zt, block_mask=block, enable_gqa=True),
        "flex pasta": lambda q, k, v: flex(q, k, v, score_mod=pa, block_mask=block, enable_gqa=True),
    }


def eager(q, k, v, scaling):
    """transformers' eager attention: repeat K/V, materialise the map, softmax in fp32."""
    R = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(R, 1), v.repeat_interleave(R, 1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scaling
    N, Q = k.shape[2], q.shape[2]
    s = s.masked_fill(torch.ones(Q, N, dtype=torch.bool, device=q.device).triu(N - Q + 1), float("-inf"))
    return torch.matmul(torch.softmax(s.float(), -1).to(q.dtype), v)


# --------------------------------------------------------------------------- measurement


def measure(fn, *, mem: bool = True) -> dict:
    """Median device ms over do_bench, host us per call (no sync inside), peak extra memory of one call (MiB)."""
    try:
        fn()
        torch.cuda.synchronize()
        peak = None
        if mem:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        eager = do_bench(fn, warmup=25, rep=200, return_mode="median")
        t = time.perf_counter()
        for _ in range(10):
            fn()
        host_us = (time.perf_counter() - t) / 10 * 1e6
        torch.cuda.synchronize()
        return {"ms": graph_ms(fn), "eager_ms": eager, "host_us": host_us, "peak_mib": peak}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": None, "eager_ms": None, "host_us": None, "peak_mib": None, "note": "out of memory"}


def measure_eager(fn) -> dict:
    """A whole model forward, as users run it: eager, median of do_bench, and its peak memory."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return {"ms": do_bench(fn, warmup=100, rep=2000, return_mode="median"), "peak_mib": peak}


def graph_ms(fn) -> float | None:
    """Device time of one call, without host overhead: the call captured in a CUDA graph, replays timed."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = do_bench(graph.replay, warmup=25, rep=200, return_mode="median")
        del graph
        return ms
    except Exception as e:  # a call that cannot be captured (host sync, unsupported op)
        print(f"    (no graph: {type(e).__name__}: {str(e).splitlines()[0][:100]})", file=sys.stderr)
        torch.cuda.synchronize()
        return None


def prefill_row(shape: str, N: int, args) -> list[dict]:
    H, Hkv, D = SHAPES[shape]
    q, k, v = inputs(H, Hkv, D, N)
    mask, sc = causal(N), D**-0.5
    m = methods(shape)
    zt, pa, pr, vr = (m[x].prefill(N) for x in ("zerotuning", "pasta", "head_prune", "var"))
    act_fwd, kept = m["act"].begin(N, N), {}
    act_known = m["act"].tables(act_fwd, N, m["act"].detector(q, k, v, mask, sc, kept))
    act_pre = kept["pre"]
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sc, enable_gqa=True)  # noqa: E731
    fns = {"sdpa": sdpa}
    if not args.no_flex and N in [int(x) for x in args.flex.split(",") if x]:
        for name, f in flex_fns(H, Hkv, N, N).items():
            fns[name] = lambda f=f: f(q, k, v)
    if N <= 4096:
        fns["eager"] = lambda: eager(q, k, v, sc)
        fns["reference zerotuning"] = lambda: reference.attention(q, k, v, zt, scaling=sc)
    fns.update(
        {
            "attnedit zerotuning": lambda: triton_ops.attention(q, k, v, zt, mask, scaling=sc),
            "attnedit zerotuning (fused)": lambda: triton_ops.attention(q, k, v, zt, mask, scaling=sc, path="fused"),
            "attnedit pasta": lambda: triton_ops.attention(q, k, v, pa, mask, scaling=sc),
            "attnedit head prune": lambda: triton_ops.attention(q, k, v, pr, mask, scaling=sc),
            "attnedit act (+detection)": lambda: act_full(m["act"], act_fwd, q, k, v, mask, sc, N),
            "  act: column scores alone": lambda: triton_ops.column_scores(q, k, act_pre, mask, scaling=sc),
            "  act: attention, sinks known": lambda: triton_ops.attention(q, k, v, act_known, mask, scaling=sc),
            "attnedit var": lambda: triton_ops.attention(q, k, v, vr, mask, scaling=sc),
            "attnedit plain (fused)": lambda: triton_ops.attention(q, k, v, None, mask, scaling=sc, path="fused"),
        }
    )
    return run_all(fns, shape, N, "prefill")


def decode_row(shape: str, N: int, args) -> list[dict]:
    H, Hkv, D = SHAPES[shape]
    q, k, v = inputs(H, Hkv, D, N, Q=1)
    mask, sc = causal(N, 1), D**-0.5
    m = methods(shape)
    zt, pr, ac, vr = (m[x].decode(N) for x in ("zerotuning", "head_prune", "act", "var"))
    fns = {
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sc, enable_gqa=True),
        "attnedit plain": lambda: triton_ops.attention(q, k, v, None, mask, scaling=sc),
        "attnedit zerotuning": lambda: triton_ops.attention(q, k, v, zt, mask, scaling=sc),
        "attnedit head prune": lambda: triton_ops.attention(q, k, v, pr, mask, scaling=sc),
        "attnedit act": lambda: triton_ops.attention(q, k, v, ac, mask, scaling=sc),
        "attnedit var": lambda: triton_ops.attention(q, k, v, vr, mask, scaling=sc),
    }
    return run_all(fns, shape, N, "decode")


def run_all(fns: dict, shape: str, N: int, kind: str) -> list[dict]:
    """Measure every variant; SDPA is measured first and again last, and ratios use the mean of the two."""
    rows = []
    for name, fn in list(fns.items()) + [("sdpa (again)", fns["sdpa"])]:
        t = time.time()
        r = measure(fn)
        rows.append({"shape": shape, "kind": kind, "tokens": N, "variant": name, **r})
        print(
            f"  {shape:12s} {kind:7s} {N:6d} {name:30s} {r['ms'] if r['ms'] is None else round(r['ms'], 4)!s:>9} ms "
            f"({time.time() - t:.1f}s)",
            file=sys.stderr,
            flush=True,
        )
    first, last = rows[0], rows.pop()
    first["sdpa_drift"] = None if not last["ms"] or not first["ms"] else last["ms"] / first["ms"] - 1
    for key, rkey in (("ms", "ratio"), ("eager_ms", "eager_ratio")):
        base = (first[key] + last[key]) / 2 if first[key] and last[key] else first[key]
        for r in rows:
            r[rkey] = None if r[key] is None or not base else r[key] / base
    for r in rows:
        r["mem_ratio"] = None if r["peak_mib"] is None or not first["peak_mib"] else r["peak_mib"] / first["peak_mib"]
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | kind | tokens | variant | device ms (graph) | x SDPA | eager ms | x SDPA | host us/call | peak MiB "
        "| x SDPA mem |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x, p: "—" if x is None else f"{x:.{p}f}"  # noqa: E731
    for r in rows:
        name = r["variant"] + (f" (drift {100 * r['sdpa_drift']:+.1f}%)" if r.get("sdpa_drift") is not None else "")
        lines.append(
            f"| {r['shape']} | {r['kind']} | {r['tokens']} | {name} | {fmt(r['ms'], 3)} | {fmt(r['ratio'], 2)} | "
            f"{fmt(r.get('eager_ms'), 3)} | {fmt(r.get('eager_ratio'), 2)} | {fmt(r.get('host_us'), 0)} | "
            f"{fmt(r['peak_mib'], 0)} | {fmt(r['mem_ratio'], 2)} |"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- sweep and end to end


def sweep(args) -> None:
    """Tile shapes of the fused kernel (plain, ZeroTuning members, VAR) against SDPA, per shape and length."""
    cfgs = {
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 3), (128, 32, 8, 3)],
        64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    }
    for shape in SHAPES:
        H, Hkv, D = SHAPES[shape]
        for N in (4096, 16384):
            q, k, v = inputs(H, Hkv, D, N)
            mask, sc = causal(N), D**-0.5
            zt, vr = Method(shape, "zerotuning").prefill(N), Method(shape, "var").prefill(N)
            base = do_bench(
                lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=sc, enable_gqa=True
                ),
                warmup=25,
                rep=200,
                return_mode="median",
            )
            print(f"{shape} N={N} sdpa {base:.3f} ms", flush=True)
            for cfg in cfgs[D]:
                out = []
                for name, tb in (("plain", None), ("zt", zt), ("var", vr)):
                    try:
                        ms = do_bench(
                            lambda: triton_ops.attention(q, k, v, tb, mask, scaling=sc, path="fused", config=cfg),
                            warmup=25,
                            rep=200,
                            return_mode="median",
                        )
                        out.append(f"{name} {ms:.3f} ({ms / base:.2f}x)")
                    except Exception as e:  # a config that does not compile (shared memory, registers)
                        out.append(f"{name} failed: {type(e).__name__}")
                print(f"  {cfg}: " + "; ".join(out), flush=True)


def sweep_bulk() -> None:
    """Tiles of the bulk epilogue (VAR's tables, its member passes after cuDNN's flash bulk) per shape and length.

    Each candidate (BLOCK_M, num_warps, num_stages) is written into `triton_prefill.BULK_TILES` for the
    run and timed alone (CUDA graph) in the same flash output's memory, as `triton_ops` runs it; the
    largest difference from the fused path's output is printed beside it. With the shipped tiles,
    also: both passes into a new output, the first pass alone (the moves' keep set to 1, so that no
    row is edited and no block runs the second pass), the share of rows and of 64-row blocks the edit
    changes, and cuDNN's attention of the rows after the image over the image's keys alone (what a
    design that took the image's masses from a flash call would pay for them).
    """
    for shape, N in (("llama3.1-8b", 8192), ("llama3.1-8b", 16384), ("smollm2", 8192)):
        H, Hkv, D = SHAPES[shape]
        key = (64 if D <= 64 else D, 2)
        shipped = triton_prefill.BULK_TILES[key]
        q, k, v = inputs(H, Hkv, D, N)
        mask, sc = causal(N), D**-0.5
        var = Method(shape, "var")
        tb = var.prefill(N)
        t = triton_ops._Prepared.of(tb, q)
        members = triton_prefill.member_tiles(t.key_group, triton_prefill.pick_config(D, 2)[1])
        bulk = triton_ops._flash_with_lse(q, k, v, sc)
        kw = dict(scaling=sc, diag=0, q_pos0=0, key_group=t.key_group, n_groups=t.n_groups, moves=t.moves)
        want = triton_ops.attention(q, k, v, tb, mask, scaling=sc, path="fused").float()
        sdpa = graph_ms(
            lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=sc, enable_gqa=True)
        )
        print(f"{shape} N={N}: SDPA {sdpa:.3f} ms; shipped tiles {shipped}", flush=True)
        mv_i, mv_f, keep, row_start = t.moves
        lean = dict(kw, moves=(mv_i, mv_f, torch.ones_like(keep), row_start))
        flash, flash1, flash2 = ((bulk[0].clone(), bulk[1]) for _ in range(3))
        # in the flash output's own memory, as `triton_ops` runs it (cuDNN's output is (B, Q, H, D) in memory)
        both = graph_ms(
            lambda: triton_prefill.prefill(q, k, v, members=members, bulk=flash, out=flash[0].transpose(1, 2), **kw)
        )
        first = graph_ms(
            lambda: triton_prefill.prefill(q, k, v, members=members, bulk=flash1, out=flash1[0].transpose(1, 2), **lean)
        )
        apart = graph_ms(lambda: triton_prefill.prefill(q, k, v, members=members, bulk=flash2, **kw))
        out = triton_prefill.prefill(q, k, v, members=members, bulk=(bulk[0].clone(), bulk[1]), **kw)[0]
        changed = (out.float() - bulk[0].transpose(1, 2).float()).abs().amax(-1)[0] > 1e-2  # (Q, H)
        blocks = torch.nn.functional.pad(changed, (0, 0, 0, -N % 64)).view(-1, 64, H).any(1)
        lo, n = var.image(N)
        qs, ks, vs = q[:, :, lo + n :], k[:, :, lo : lo + n], v[:, :, lo : lo + n]
        image_only = graph_ms(
            lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
                qs, ks, vs, None, True, 0.0, False, False, scale=sc
            )
        )
        rows, edited = changed.float().mean().item(), blocks.float().mean().item()
        print(
            f"  shipped, in place: both passes {both:.4f} ms, first pass alone {first:.4f} ms "
            f"(both passes into a new output: {apart:.4f} ms); rows edited "
            f"{rows:.3f}, 64-row blocks with an edited row {edited:.3f}; "
            f"cuDNN over the image's {n} keys from row {lo + n}: {image_only:.4f} ms",
            flush=True,
        )
        for tiles in ((64, 4, 1), (64, 4, 3), (128, 4, 1), (128, 8, 1), (128, 8, 3)):
            triton_prefill.BULK_TILES[key] = tiles
            flash = (bulk[0].clone(), bulk[1])

            def fn(flash=flash):
                return triton_prefill.prefill(q, k, v, members=members, bulk=flash, out=flash[0].transpose(1, 2), **kw)

            try:
                err = (fn()[0].float() - want).abs().max().item()
                print(f"  {tiles}: {graph_ms(fn):.4f} ms, max |difference| from the fused path {err:.1e}", flush=True)
            except Exception as e:  # a tiling that does not compile (registers, shared memory)
                print(f"  {tiles}: failed {type(e).__name__}", flush=True)
        triton_prefill.BULK_TILES[key] = shipped


def sweep_colsum() -> None:
    """Tile shapes of the column-sum kernel (ACT's sink scores) against SDPA."""
    cfgs = {
        128: [(64, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 8, 3)],
        64: [(64, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    }
    for shape in SHAPES:
        H, Hkv, D = SHAPES[shape]
        for N in (4096, 16384):
            q, k, v = inputs(H, Hkv, D, N)
            sc = D**-0.5
            base = do_bench(
                lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=sc, enable_gqa=True
                ),
                warmup=25,
                rep=200,
                return_mode="median",
            )
            lse2 = (
                torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=sc)[
                    1
                ].reshape(1, H, N)
                * 1.4426950408889634
            ).contiguous()
            out = []
            for cfg in cfgs[D]:
                try:
                    ms = do_bench(
                        lambda: triton_colsum.colsum(q, k, lse2, scaling=sc, diag=0, config=cfg),
                        warmup=25,
                        rep=200,
                        return_mode="median",
                    )
                    out.append(f"{cfg} {ms:.3f} ({ms / base:.2f}x)")
                except Exception as e:  # a config that does not compile
                    out.append(f"{cfg} failed: {type(e).__name__}")
            print(f"colsum {shape} N={N} sdpa {base:.3f}: " + "; ".join(out), flush=True)


def sweep_decode() -> None:
    """Key splits, tile width and pipelining of the decode kernel against SDPA (graph replay)."""
    for shape in SHAPES:
        H, Hkv, D = SHAPES[shape]
        for N in (4096, 32768):
            q, k, v = inputs(H, Hkv, D, N, Q=1)
            sc = D**-0.5
            base = graph_ms(
                lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=sc, enable_gqa=True)
            )
            auto = triton_decode.n_splits(N, Hkv, 132)
            out = []
            for S in (auto // 2, auto, 2 * auto):
                for bn, st in ((64, 2), (64, 3), (128, 2), (128, 3)):
                    ms = graph_ms(
                        lambda: triton_decode.decode(
                            q, k, v, scaling=sc, diag=N - 1, q_pos=N - 1, splits=max(1, S), block_n=bn, num_stages=st
                        )
                    )
                    out.append(f"S={max(1, S)} bn={bn} st={st}: {ms / base:.2f}x")
            print(f"decode {shape} N={N} sdpa {base * 1e3:.1f} us: " + "; ".join(out), flush=True)


def backends(args) -> None:
    """Which SDPA kernel runs by default, and the private flash ops that also return the log-sum-exp."""
    for shape in SHAPES:
        H, Hkv, D = SHAPES[shape]
        for N in (4096, 16384):
            q, k, v = inputs(H, Hkv, D, N)
            sc = D**-0.5
            res = {
                "default": lambda: torch.nn.functional.scaled_dot_product_attention(
                    q, k, v, is_causal=True, scale=sc, enable_gqa=True
                )
            }
            for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):

                def f(b=b):
                    with sdpa_kernel([b]):
                        return torch.nn.functional.scaled_dot_product_attention(
                            q, k, v, is_causal=True, scale=sc, enable_gqa=True
                        )

                res[str(b).split(".")[-1]] = f
            res["aten flash+lse"] = lambda: torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, True, False, scale=sc
            )
            res["aten cudnn+lse"] = lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, True, False, scale=sc
            )
            res["aten efficient+lse"] = lambda: torch.ops.aten._scaled_dot_product_efficient_attention(
                q, k, v, None, True, 0.0, True, scale=sc
            )
            out = []
            for name, fn in res.items():
                try:
                    out.append(f"{name} {do_bench(fn, warmup=25, rep=200, return_mode='median'):.3f}")
                except Exception as e:  # a backend that refuses this input
                    out.append(f"{name} n/a ({str(e).splitlines()[0][:80]})")
            print(f"{shape} N={N}: " + "; ".join(out), flush=True)


def profile(args) -> None:
    """Host time per call of each path (no device sync inside), and where it goes (cProfile)."""
    H, Hkv, D = SHAPES["llama3.1-8b"]
    N = 4096
    q, k, v = inputs(H, Hkv, D, N)
    qd, kd, vd = inputs(H, Hkv, D, N, Q=1)
    sc = D**-0.5
    zt, pr = Method("llama3.1-8b", "zerotuning").prefill(N), Method("llama3.1-8b", "head_prune").prefill(N)
    ztd = Method("llama3.1-8b", "zerotuning").decode(N)
    fns = {
        "sdpa prefill": lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=sc, enable_gqa=True
        ),
        "zerotuning prefill": lambda: triton_ops.attention(q, k, v, zt, causal(N), scaling=sc),
        "head prune prefill": lambda: triton_ops.attention(q, k, v, pr, causal(N), scaling=sc),
        "sdpa decode": lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, scale=sc, enable_gqa=True),
        "plain decode": lambda: triton_ops.attention(qd, kd, vd, None, causal(N, 1), scaling=sc),
        "zerotuning decode": lambda: triton_ops.attention(qd, kd, vd, ztd, causal(N, 1), scaling=sc),
    }
    for name, fn in fns.items():
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20):
            fn()
        host = (time.perf_counter() - t) / 20
        torch.cuda.synchronize()
        print(f"{name:22s} host {host * 1e6:8.1f} us/call", flush=True)
    for mod, attr in ((triton_prefill, "_LAUNCH"), (triton_decode, "_LAUNCH_DECODE"), (triton_colsum, "_LAUNCH")):
        ln = getattr(mod, attr)
        print(f"{mod.__name__}.{attr}: {ln.fast} fast launches, {len(ln.cache)} compiled variants", flush=True)
    for name in ("plain decode", "zerotuning prefill"):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(20):
            fns[name]()
        prof.disable()
        torch.cuda.synchronize()
        print(f"--- {name}: top functions by own time (20 calls)")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


def e2e(args) -> list[dict]:
    """8k-token prefill of a random Llama-3.1-8B-shaped model: unpatched SDPA against patched recipes."""
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
    )
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
        torch.set_default_dtype(torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (1, args.e2e_tokens), device="cuda")
    recipes = {
        "zerotuning (all heads)": "interventions: [{type: zerotuning, gamma: 3.5, layers: all}]",
        "head prune (8 heads)": "interventions: [{type: head_prune, "
        "heads: {3: [0, 1], 10: [4], 17: [2, 30], 22: [9], 28: [5, 6]}}]",
        "act (layers 2..30)": "interventions: [{type: act, beta: 0.4, tau: 0.1}]",
        "pasta (layers 8..15)": "interventions: [{type: pasta, alpha: 0.01, layers: '8:16'}]",
    }

    def fwd():
        with torch.no_grad():
            return model(ids, logits_to_keep=1).logits

    rows = [{"variant": "unpatched sdpa", **measure_eager(fwd)}]
    for name, text in recipes.items():
        recipe = attnedit.Recipe.from_str(text, "bench.yaml")
        spans = [[(100, 196)]] if "pasta" in name else None
        with attnedit.patch(model, recipe, backend="triton", spans=spans):
            rows.append({"variant": name, **measure_eager(fwd)})
    base = rows[0]["ms"]
    for r in rows:
        r["throughput_ratio"] = None if r["ms"] is None else base / r["ms"]
        r["tokens_per_s"] = None if r["ms"] is None else args.e2e_tokens / r["ms"] * 1e3
        print(
            f"  e2e {r['variant']:28s} {r['ms']:.1f} ms  {r['tokens_per_s']:.0f} tok/s  x{r['throughput_ratio']:.3f}",
            file=sys.stderr,
            flush=True,
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for table.md and results.json")
    ap.add_argument("--prefill", default="1024,4096,16384,32768")
    ap.add_argument("--decode", default="4096,32768")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--flex", default="4096,16384", help="prefill lengths that also run FlexAttention (each compiles)")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--backends", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--sweep-colsum", action="store_true")
    ap.add_argument("--sweep-bulk", action="store_true", help="the bulk epilogue's tiles (VAR's tables)")
    ap.add_argument("--sweep-decode", action="store_true")
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--e2e-tokens", type=int, default=8192)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.exit(2, "error: bench_attention.py times CUDA kernels and graphs: it needs a CUDA GPU\n")
    torch.backends.cuda.matmul.allow_tf32 = False
    print(device_line(), flush=True)
    if args.sweep:
        return sweep(args)
    if args.backends:
        return backends(args)
    if args.profile:
        return profile(args)
    if args.sweep_colsum:
        return sweep_colsum()
    if args.sweep_bulk:
        return sweep_bulk()
    if args.sweep_decode:
        return sweep_decode()
    rows, e2e_rows = [], []
    if args.prefill or args.decode:
        for shape in args.shapes.split(","):
            for N in [int(x) for x in args.prefill.split(",") if x]:
                rows += prefill_row(shape, N, args)
                torch.cuda.empty_cache()
            for N in [int(x) for x in args.decode.split(",") if x]:
                rows += decode_row(shape, N, args)
    if args.e2e:
        e2e_rows = e2e(args)
    text = table(rows) if rows else ""
    if e2e_rows:
        text += "\n\n| end to end, 8k prefill | ms | tokens/s | x unpatched throughput | peak MiB |\n"
        text += "|---|---|---|---|---|\n"
        text += "\n".join(
            f"| {r['variant']} | {r['ms']:.1f} | {r['tokens_per_s']:.0f} | {r['throughput_ratio']:.3f} | "
            f"{r['peak_mib']:.0f} |"
            for r in e2e_rows
        )
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"command": "python " + " ".join(sys.argv), "device": device_line()}
        tag = "e2e" if args.e2e and not rows else "attention"
        (args.out / f"{tag}.json").write_text(json.dumps({**meta, "rows": rows, "e2e": e2e_rows}, indent=1))
        (args.out / f"{tag}.md").write_text(f"`{meta['command']}`\n\n{meta['device']}\n\n{text}\n")


if __name__ == "__main__":
    main()
