"""Host time of one layer's attention call in a dynamic-cache decoding step, on a CUDA GPU, by part.

With the dynamic cache a decoding step is host-bound (Python and launches per layer): what a patch
costs there is what its attention call costs on the host against transformers' SDPA call. This
script times that call alone, layer 3 of a 6-layer model of `bench_generate.py`'s shape (random
bf16 weights), after a prefill of `--keys - 1` tokens and one decoding step under the patch:

- `total`: the attention function transformers calls (`sdpa_attention_forward` unpatched, the
  patch's `_attention` patched) on q (B, H, 1, D) and k, v (B, Hkv, keys, D);
- patched only, its parts: `layer_tables` (the runtime's tables for the step), `decode_step` (the
  backend's step: plan check and launch), `fits` (the plan check), `decoder` (the launch path with
  its output allocation), `empty` (one output allocation, for scale).

Each figure is (host us per call, wall us per call): the best of 5 rounds of `--calls` calls made back
to back, the host time read before the round's final synchronisation and the wall time after it. Host
below wall means the GPU, not the host, set the pace of that loop (a full model adds ~0.6 ms of other
host work per layer, so there the host still does).

    python benchmarks/decode_layer.py [--batch 1] [--keys 2049] [--variants sdpa,zerotuning,act,var]
        [--calls 2000] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate as bg  # noqa: E402

LAYERS, LAYER = 6, 3


def best(fn, calls: int) -> tuple[float, float]:
    """(host us, wall us) per call: the best of 5 rounds of `calls` back-to-back calls, after 50 warm-up calls."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    host = wall = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        h = time.perf_counter() - t
        torch.cuda.synchronize()
        w = time.perf_counter() - t
        host, wall = min(host, h / calls * 1e6), min(wall, w / calls * 1e6)
    return round(host, 2), round(wall, 2)


def measure(model, recipe_of: dict, name: str, batch: int, keys: int, calls: int) -> dict:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: PLC0415

    from attnedit import runtime as R  # noqa: PLC0415
    from attnedit.kernels import dispatch, triton_ops  # noqa: PLC0415

    cfg = model.config
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    D = cfg.hidden_size // H
    scaling = D**-0.5
    q = torch.randn(batch, H, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, Hkv, keys, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, Hkv, keys, D, device="cuda", dtype=torch.bfloat16)
    module = bg.attnedit.modelinfo.decoder_layers(model)[LAYER].self_attn
    if name == "sdpa":
        return {
            "layer": LAYER,
            "total": best(lambda: sdpa_attention_forward(module, q, k, v, None, scaling=scaling), calls),
        }
    ids, _, _ = bg.prompts(batch, keys - 1, "cuda")
    spans = bg._spans(batch, keys - 1) if name == "pasta" else None
    patch = bg.attnedit.patch(model, recipe_of[name], spans=spans).apply()
    edited = sorted(patch.compiled.layers)
    if not edited:
        patch.remove()
        raise SystemExit(
            f"error: {name}'s recipe compiles to no layer's tables (its per-input head scales are chosen at each "
            "prefill); time it with bench_generate.py"
        )
    layer = LAYER if LAYER in edited else edited[len(edited) // 2]  # an edited layer, the middle one if not 3
    module = bg.attnedit.modelinfo.decoder_layers(model)[layer].self_attn
    try:
        with torch.no_grad():
            cache = model(input_ids=ids, use_cache=True).past_key_values
            model(input_ids=torch.full((batch, 1), 5, device="cuda"), past_key_values=cache, use_cache=True)
            fwd = patch._fwd
            view = fwd.on(q.device)
            mask = patch._mask_info(fwd, view, None, q, k, "triton")
            plan = R.plan_on(patch._device_plans, patch.compiled.layers[layer], q.device)

            def tables():
                return R.layer_tables(plan, fwd, layer, device=q.device, heads=H, k_len=keys, kv_offset=mask.kv_offset)

            t = tables()
            plans = patch.state.decode_plans
            dispatch.decode_step("triton", plans, layer, q, k, v, t, mask, scaling=scaling)
            step = plans[layer]
            if step.decoder is None:
                raise SystemExit(f"error: {name}'s decoding step runs the reference here, not the kernels")
            groups = t.key_group if step.use_groups else None
            starts = None
            if step.starts is not None:
                starts = triton_ops._row_starts([t.moves[i] for i in step.starts], batch, q.device, step.never)
            diag, q_pos = keys - 1, mask.q_offset
            scale = None if t.out_scale is None else t.out_scale.to(q.device, torch.float32).contiguous()
            shift = None if t.out_shift is None else t.out_shift.to(q.device, torch.float32).contiguous()
            return {
                "layer": layer,
                "total": best(lambda: patch._attention(module, q, k, v, None, scaling=scaling), calls),
                "layer_tables": best(tables, calls),
                "decode_step": best(
                    lambda: dispatch.decode_step("triton", plans, layer, q, k, v, t, mask, scaling=scaling), calls
                ),
                "fits": best(lambda: step.fits(q, k, t, mask, scaling, None), calls),
                "decoder": best(
                    lambda: step.decoder(
                        q, k, v, diag=diag, q_pos=q_pos, key_group=groups, scale=scale, shift=shift, row_start=starts
                    ),
                    calls,
                ),
                "empty": best(lambda: torch.empty(batch, 1, H, D, device="cuda", dtype=torch.bfloat16), calls),
            }
    finally:
        patch.remove()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--keys", type=int, default=2049, help="keys in the cache at the timed step (the prompt + 1)")
    ap.add_argument("--variants", type=bg.names, default=["sdpa", "zerotuning", "act", "var"])
    ap.add_argument("--calls", type=int, default=2000, help="calls per timed round")
    ap.add_argument("--shape", choices=bg.SHAPES, default="llama3.1-8b")
    ap.add_argument("--out", type=Path, help="JSON file for the figures")
    args = ap.parse_args()
    for flag, value, least in (("--batch", args.batch, 1), ("--keys", args.keys, 2), ("--calls", args.calls, 1)):
        if value < least:
            ap.error(f"{flag} must be at least {least}")
    if "eager" in args.variants:
        ap.error("eager is not an attention call this script times; allowed: sdpa and the methods")
    if not torch.cuda.is_available():
        raise SystemExit("error: decode_layer.py times CUDA launches: it needs a CUDA GPU")
    model = bg.build_model(args.shape, LAYERS, torch.bfloat16, "cuda")
    recipe_of = bg.recipes(LAYERS, model.config.num_attention_heads, model.config.hidden_size)
    rows = {}
    for name in args.variants:
        rows[name] = measure(model, recipe_of, name, args.batch, args.keys, args.calls)
        parts = [(p, hw) for p, hw in rows[name].items() if p != "layer"]
        print(
            f"{name} (layer {rows[name]['layer']}): " + ", ".join(f"{p} {h:.1f} / {w:.1f}" for p, (h, w) in parts),
            flush=True,
        )
    print(f"\nbatch {args.batch}, {args.keys} keys; host / wall us per call")
    print("| variant | attention call | layer tables | backend step | plan check | launch path | one allocation |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        cells = [r.get(p) for p in ("total", "layer_tables", "decode_step", "fits", "decoder", "empty")]
        print(f"| {name} | " + " | ".join("" if c is None else f"{c[0]:.1f} / {c[1]:.1f}" for c in cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "batch": args.batch, "keys": args.keys,
                                        "device": torch.cuda.get_device_name(), "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
