"""Run every kernel check under Triton's CPU interpreter and write the results as JSON.

Started by test_triton_interpret.py in a fresh process with TRITON_INTERPRET=1
(the variable must be set before Triton is first imported). Usage:
``TRITON_INTERPRET=1 python interpret_worker.py OUT.json``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for kernel_cases

import bounds  # noqa: E402
import kernel_cases as kc  # noqa: E402
import torch  # noqa: E402

# recipes whose choices are scored over the prompt's KV cache: a chunk of queries after cached keys
CACHED = {
    "zerotuning": "interventions: [{type: zerotuning, gamma: 3.0, layers: [0, 1]}]",
    "head_prune": "interventions: [{type: head_prune, heads: {0: [1], 1: [0, 3]}}]",
    "act": "interventions: [{type: act, layers: '1:', beta: 0.3, tau: 0.05}]",
}


def check_cached_choices(name: str) -> dict:
    """Multi-token choices scored over the prompt's cache on a tiny Llama: Triton kernels against the reference."""
    from models import tiny

    import attnedit
    from attnedit.evals.prompts import Encoded
    from attnedit.evals.scoring import choice_scores

    model = tiny("llama")
    g = torch.Generator().manual_seed(0)

    def ids(n):
        return torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()

    items = [
        Encoded(i, f"p{i}", ids(5 + 3 * i % 11), [ids(1 + (i + j) % 4) for j in range(2 + i % 3)]) for i in range(6)
    ]
    rec = attnedit.Recipe.from_str(CACHED[name])
    got = {}
    for backend in ("reference", "triton"):
        with attnedit.patch(model, rec, backend=backend):
            got[backend], _ = choice_scores(model, items, 0, chunk=4, cached=True)
    with torch.no_grad():
        plain, _ = choice_scores(model, items, 0, chunk=4, cached=True)
    pairs = [(a, b, c) for x, y, z in zip(got["reference"], got["triton"], plain) for a, b, c in zip(x, y, z)]
    return dict(
        err=max(abs(a - b) for a, b, _ in pairs),
        effect=max(abs(a - c) for a, _, c in pairs),
        multi=sum(len(c) > 1 for it in items for c in it.choice_ids),
    )


def check_step_launches(name: str) -> dict:
    """Kernel launches of one decoding step of a patched tiny Llama over a short dynamic cache."""
    from models import tiny

    import attnedit
    from attnedit.kernels import triton_common

    model = tiny("llama")
    ids = torch.randint(3, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    launches = []
    real = triton_common.Launcher.launch

    def counting(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        return real(self, *args, **kwargs)

    with attnedit.patch(model, attnedit.Recipe.from_str(CACHED[name]), backend="triton") as p, torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
        triton_common.Launcher.launch = counting
        try:
            model(input_ids=ids[:, :1], cache=cache, use_cache=True)
        finally:
            triton_common.Launcher.launch = real
        layers = len(p.compiled.layers)
    return dict(launches=launches, layers=layers)


# recipes whose decoding steps keep a per-layer plan (checked across two inputs)
PLANNED = dict(
    CACHED,
    pasta="interventions: [{type: pasta, heads: {0: [0, 2], 1: [1]}, alpha: 0.01}]",
    # moves with per-input row starts (after each row's image tokens, the config's image token id)
    var="interventions: [{type: var, tau: 1.5, p: 0.2, rho: 1.0, min_image_mass: 0.0, layers: '1:'}]",
)


def check_decode_plans(name: str) -> dict:
    """Two inputs decoded one after the other through one patch, against the reference backend.

    The first input is unpadded with one set of spans, the second left-padded with others (the same
    batch size, so only the decoding plans' own checks and the prefill's reset tell them apart).
    Runs again with that invalidation switched off (plans never rebuilt or cleared): the second
    input's steps must then go wrong, which shows the comparison can fail.
    """
    from models import tiny

    import attnedit
    from attnedit.kernels import triton_ops

    model = tiny("llama")
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(4)
    first = torch.randint(3, V - 1, (2, 9), generator=g)
    second = torch.randint(3, V - 1, (2, 12), generator=g)
    pad = torch.ones(2, 12, dtype=torch.long)
    pad[1, :5] = 0
    steps = torch.randint(3, V - 1, (3, 2, 1), generator=g)
    if name == "var":  # image tokens at other places in each input
        model.config.image_token_id = V - 1
        first[:, 1:4] = V - 1
        second[0, 3:8] = second[1, 6:9] = V - 1
    inputs = ((first, None, [[(1, 4)], [(2, 6)]]), (second, pad, [[(6, 9)], [(7, 11)]]))

    class Kept(dict):
        def clear(self):  # the prefill's reset, switched off
            pass

    def run(backend: str, broken: bool = False) -> list[torch.Tensor]:
        logits = []
        recipe = attnedit.Recipe.from_str(PLANNED[name])
        with attnedit.patch(model, recipe, backend=backend) as p, torch.no_grad():
            if broken:
                p.state.decode_plans = Kept()
            for ids, mask, spans in inputs:
                p.set_spans(spans)
                cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
                for nxt in steps:
                    if mask is not None:
                        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
                    out = model(input_ids=nxt, attention_mask=mask, cache=cache, use_cache=True)
                    logits.append(out.logits[:, -1])
        return logits

    ref = run("reference")
    got = run("triton")
    fits = triton_ops.DecodePlan.fits
    triton_ops.DecodePlan.fits = lambda *a: True
    try:
        stale = run("triton", broken=True)
    except Exception as e:  # a stale plan may also crash: that counts as going wrong
        stale = e
    finally:
        triton_ops.DecodePlan.fits = fits
    n = len(steps)
    err = max((a - b).abs().max().item() for a, b in zip(got, ref))
    if isinstance(stale, Exception):
        stale_err = float("inf")
    else:
        stale_err = max((a - b).abs().max().item() for a, b in zip(stale[n:], ref[n:]))
    return dict(err=err, stale_err=stale_err)


def check_decode_splits(ops, spec, splits: int) -> dict:
    """A decoding step with a forced split count: output and masses against the reference, and its launches."""
    from attnedit.kernels import triton_common

    launches = []
    real = triton_common.Launcher.launch

    def counting(self, *args, **kwargs):
        launches.append(self.fn.__name__)
        return real(self, *args, **kwargs)

    triton_common.Launcher.launch = counting
    try:
        r = kc.check_masses(ops, spec, seed=13, splits=splits)
    finally:
        triton_common.Launcher.launch = real
    return dict(r, launches=launches)


def check_split_choice() -> dict:
    """A 2048-key decoding step: one launch when the host drives it, key splits when the position is on the device.

    Both against plain softmax attention in fp32.
    """
    from attnedit.kernels import triton_common, triton_decode

    g = torch.Generator().manual_seed(17)
    B, H, Hkv, D, K = 1, 4, 2, 16, 2048
    q = torch.randn(B, H, 1, D, generator=g)
    k = torch.randn(B, Hkv, K, D, generator=g)
    v = torch.randn(B, Hkv, K, D, generator=g)
    scale = D**-0.5
    kr, vr = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    ref = (torch.softmax((q @ kr.transpose(-1, -2)) * scale, -1) @ vr).transpose(1, 2)  # (B, 1, H, D)
    launches: dict[str, list[str]] = {"host": [], "device": []}
    real = triton_common.Launcher.launch
    out = {}
    for where in ("host", "device"):

        def counting(self, *args, _w=where, **kwargs):
            launches[_w].append(self.fn.__name__)
            return real(self, *args, **kwargs)

        triton_common.Launcher.launch = counting
        try:
            if where == "host":
                o, _ = triton_decode.decode(q, k, v, scaling=scale, diag=K - 1, q_pos=K - 1)
            else:  # a static cache keeps the position on the device: diag and q_pos are offsets from it
                pos = torch.tensor([K - 1])
                o, _ = triton_decode.decode(q, k, v, scaling=scale, diag=0, q_pos=0, pos=pos)
        finally:
            triton_common.Launcher.launch = real
        out[where] = float((o.float() - ref).abs().max())
    return {"launches": launches, "err_host": out["host"], "err_device": out["device"]}


def main(out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    bounds.install()
    from attnedit.kernels import triton_ops as ops
    from attnedit.kernels import triton_prefill

    jobs = {}
    for spec in kc.CASES:
        jobs[f"attention/{spec.name}"] = lambda s=spec: kc.check_attention(
            ops, s, seed=11, config=kc.tiles(s), splits=3
        )
    for spec in kc.MASS_CASES:
        jobs[f"masses/{spec.name}"] = lambda s=spec: kc.check_masses(ops, s, seed=3, config=kc.tiles(s), splits=2)
    for spec in kc.DECODE_CASES:
        for splits in (1, 3):
            jobs[f"decode/{spec.name}/{splits}"] = lambda s=spec, n=splits: check_decode_splits(ops, s, n)
    for spec in kc.COLSUM_CASES:
        jobs[f"colsum/{spec.name}"] = lambda s=spec: kc.check_colsum(ops, s, seed=5, config=kc.tiles(s))
    for spec in kc.BULK_CASES:
        jobs[f"bulk/{spec.name}"] = lambda s=spec: kc.check_bulk(triton_prefill, ops, s, seed=9, config=kc.tiles(s))
    for spec in kc.SPLIT_CASES:
        jobs[f"split/{spec.name}"] = lambda s=spec: kc.check_split(
            ops, triton_prefill, s, seed=13, n_sparse_after=s.extra.get("sparse_after", 1)
        )
    jobs["member_list"] = lambda: kc.check_member_list(triton_prefill)
    jobs["inert"] = lambda: kc.check_inert(ops)
    jobs["fallback"] = lambda: kc.check_fallback(ops)
    jobs["split_choice"] = check_split_choice
    for name in CACHED:
        jobs[f"cached_choices/{name}"] = lambda n=name: check_cached_choices(n)
        jobs[f"step_launches/{name}"] = lambda n=name: check_step_launches(n)
    for name in PLANNED:
        jobs[f"decode_plans/{name}"] = lambda n=name: check_decode_plans(n)
    results = {}
    for name, job in jobs.items():
        bounds.take()
        try:
            results[name] = job()
        except Exception:  # reported by the test that owns this job
            results[name] = {"error": traceback.format_exc()}
        results[name]["out_of_bounds"] = bounds.take()  # accesses outside the kernels' tensors
        print(name, results[name], flush=True)
    Path(out_path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
