"""Generation benchmark: `model.generate` of a Llama-3.1-8B-shaped model, unpatched and under each method.

A random bf16 model in Llama-3.1-8B shape (32 layers, hidden 4096, 32 heads, 8 KV heads, head_dim 128,
vocab 128256), made directly on the GPU (no download). Greedy `generate`, batch 1 with a 2k-token
prompt and batch 16 with 512-token prompts, 128 new tokens, with the dynamic cache and with the static
cache (`cache_implementation="static"`, which makes transformers compile the decoding step with
torch.compile, mode "reduce-overhead"). Every recipe goes through the public path: `Recipe.from_str`
or a built-in recipe file, then `attnedit.patch(model, recipe)`.

ms per new token = (time of generate(128 new) - time of generate(8 new)) / 120, so the prefill and
each call's first steps (CUDA-graph recording under the static cache) cancel, as far as their cost is
the same in both calls; the median interval between decoding steps (below) leaves them out, and is
the steadier figure under the static cache. With the dynamic cache
the variants are timed in rounds (each variant once per round, in turn; `--reps` rounds) and each
keeps its best round, so that a machine whose speed drifts over the run slows every variant alike;
the table also gives the range and the median of each round's ratio to that round's unpatched SDPA
(the median holds when one round is disturbed: use five rounds or more). Each dynamic round also
stamps the host time at every decoding step of its long generate (a logits processor, which
transformers calls once per new token, after a step's forward) and keeps the median interval
between steps: a burst of a few slow steps, which moves the mean, leaves the median in place. The
table gives the best round's median step and the median of the rounds' ratios of it. With `--abba N`
each variant is also compared with unpatched SDPA in N quads of short generates (SDPA, variant,
variant, SDPA, a few seconds in all; ratio of the median step intervals; a linear drift cancels),
whose median and quartiles make a second table: the rounds are far apart in time on a machine
whose speed changes within seconds, a quad is not. Ratios are to unpatched
SDPA in the same mode, measured in the same run; "x dyn" is the ratio to unpatched SDPA with the
dynamic cache. "same tokens" compares each variant's 128 greedy tokens under the static cache with its
own dynamic-cache tokens (exact only in fp32: `--dtype float32`).

Text stand-in for image tokens (VAR, VHR): the config names token id 128255 its image token (which
makes attnedit treat the model as a vision-language model) and every prompt holds a block of them
after 35 text tokens (576 at batch 1, as LLaVA-1.5's image; 256 in the 512-token prompts). VHR runs
as the paper does (`vhr-paper`: per input a text-only prefill picks the heads); the 8k prefill also
times it with its heads given (`vhr_heads`: half of each target layer's heads), its runtime alone,
since the paper's choice is a second prefill of the prompt's text by construction. VAR's sink detection
looks for massive activations, which random weights lack, so the stand-in plants them: at the input of
every layer of a prefill, the first token and three image tokens (a tenth, a half and nine tenths into
the image) hold 200 times their row's RMS in dimension 0 (a normalised value of about 61 at hidden size 4096,
where trained models' sinks reach hundreds), the same in every variant, unpatched included. VAR runs
with `var-paper`'s settings (tau 20; 8 in the narrow CPU shapes, whose normalised values cannot reach
20) and that sink dimension: four sinks per layer, three of them visual,
as the VAR paper finds a handful of visual sinks per image; rows after the image are then gated and
edited as on a real VLM. (An earlier stand-in, tau 3 on the raw random states, flagged about 1% of all
tokens, scattered over the whole prompt: every scattered sink adds a key tile to each row block's
corrections, which made VAR's 8k prefill 0.84x of unpatched.)

    python benchmarks/bench_generate.py --out benchmarks/results                 # the full table
    python benchmarks/bench_generate.py --layers 4 --new-tokens 32               # a quick run
    python benchmarks/bench_generate.py --layers 4 --dtype float32 --e2e-tokens 0  # tokens check in fp32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from importlib import resources
from pathlib import Path

import torch
import transformers

import attnedit

IMAGE_ID = 128255  # the stand-in image token (the last id of Llama-3.1's vocabulary)
SHORT = 8  # new tokens of the short generate whose time is subtracted
SHAPES = {
    "llama3.1-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
    ),
    # a CPU smoke test of the script itself (no timing value)
    "tiny": dict(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=128256,
    ),
}
VARIANTS = ("sdpa", "zerotuning", "act", "head_prune", "pasta", "vhr", "var", "eager")


# --------------------------------------------------------------------------- model, prompts, recipes


SINK_DIMS = (0,)  # the stand-in's massive-activation dimension
SINK_GAIN = 200.0  # a planted sink's value in those dimensions, in units of its row's RMS


def image_block(length: int) -> tuple[int, int]:
    """(start, n): the stand-in image tokens of a prompt of this length."""
    return 35, min(576, length // 2)


def sink_positions(length: int) -> list[int]:
    """The planted sinks of a prompt of this length: the first token and three image tokens."""
    start, n = image_block(length)
    return [0, start + n // 10, start + n // 2, start + (9 * n) // 10]


def _plant_sinks(module, args, kwargs):
    """Forward pre-hook of a decoder layer: massive activations at the sink positions of a prefill."""
    hidden = args[0] if args else kwargs["hidden_states"]
    if hidden.shape[1] < 64:  # a decoding step (prompts here are longer): nothing to plant
        return None
    hidden = hidden.clone()
    for p in sink_positions(hidden.shape[1]):  # integer indices: views (an index tensor would be copied to the GPU)
        value = SINK_GAIN * hidden[:, p].float().pow(2).mean(-1).sqrt()  # (B,)
        for d in SINK_DIMS:
            hidden[:, p, d] = value.to(hidden.dtype)
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def build_model(shape: str, layers: int, dtype: torch.dtype, device: str):
    """A random model of the shape, made on the device; its config names IMAGE_ID as the image token, and
    its prefills carry planted sinks (`sink_positions`, `SINK_DIMS`) as a VLM's hidden states do."""
    cfg = transformers.AutoConfig.for_model(
        "llama",
        num_hidden_layers=layers,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **SHAPES[shape],
    )
    cfg.image_token_id = IMAGE_ID
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device):
            torch.manual_seed(0)
            model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(old)
    for layer in model.model.layers:
        layer.register_forward_pre_hook(_plant_sinks, with_kwargs=True)
    return model.eval()


def prompts(batch: int, length: int, device: str, seed: int = 0) -> tuple[torch.Tensor, int, int]:
    """(B, T) random text ids with a block of stand-in image tokens after 35 text tokens; (ids, start, n)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, IMAGE_ID, (batch, length), generator=g)
    start, n = image_block(length)
    ids[:, start : start + n] = IMAGE_ID
    ids[:, 0] = 1
    return ids.to(device), start, n


def builtin(name: str) -> attnedit.Recipe:
    return attnedit.Recipe.from_yaml(Path(str(resources.files("attnedit.recipes") / f"{name}.yaml")))


def recipes(layers: int, n_heads: int, hidden: int) -> dict[str, attnedit.Recipe]:
    """Each method's recipe, through the public path (built-in recipe files, or YAML text)."""
    tau = min(20.0, hidden**0.5 / 2)  # VAR's threshold: the paper's 20 where planted sinks can pass it
    pruned = {}
    for i in range(8):  # 8 heads, spread over the depth (4 layers at 32 layers deep)
        pruned.setdefault((i * layers) // 8 + layers // 16, []).append((5 * i + 3) % n_heads)
    heads = ", ".join(f"{layer}: {sorted(set(hs))}" for layer, hs in sorted(pruned.items()))
    lo, hi = layers // 4, max(layers // 2, layers // 4 + 1)
    text = {
        "head_prune": f"name: bench-head-prune\ninterventions: [{{type: head_prune, heads: {{{heads}}}}}]\n",
        # pasta-example's settings (alpha 0.01, layers 8..15 of 32), its layers scaled to the depth
        "pasta": f"name: bench-pasta\ninterventions: [{{type: pasta, alpha: 0.01, layers: '{lo}:{hi}'}}]\n",
        # var-paper's settings, with the stand-in's sink dimensions (see the module docstring)
        "var": f"name: bench-var\ninterventions: [{{type: var, layers: '2:-1', tau: {tau}, rho: 0.5, p: 0.6, "
        f"min_image_mass: 0.2, sink_dims: {list(SINK_DIMS)}}}]\n",
    }
    out = {
        "zerotuning": builtin("zerotuning-paper"),  # gamma 2 on the first token, every head of every layer
        "act": builtin("act-paper"),  # beta 0.4, tau 0.1, layers 2..L-1, every head
        "vhr": builtin("vhr-paper"),  # per-input vision-aware heads, alpha 2, layer 1 and the last 14
    }
    # VHR's runtime with its heads given (half of each layer's heads, as the median rule keeps): the
    # 8k prefill's second row, without the paper's per-input text-only prefill
    half = list(range(0, n_heads, 2))
    text["vhr_heads"] = f"name: bench-vhr-heads\ninterventions: [{{type: vhr, alpha: 2.0, heads: {half}}}]\n"
    out.update({k: attnedit.Recipe.from_str(v, f"bench-{k}.yaml") for k, v in text.items()})
    return out


class Variant:
    """A context that puts the model in one variant: unpatched SDPA, unpatched eager, or a patch."""

    def __init__(self, model, name: str, recipe=None, spans=None):
        self.model, self.name, self.recipe, self.spans = model, name, recipe, spans
        self.patch = None

    def __enter__(self):
        if self.name == "eager":
            self.model.set_attn_implementation("eager")
        elif self.recipe is not None:
            self.patch = attnedit.patch(self.model, self.recipe, spans=self.spans).apply()
        return self

    def __exit__(self, *exc):
        if self.patch is not None:
            self.patch.remove()
        if self.name == "eager":
            self.model.set_attn_implementation("sdpa")


# --------------------------------------------------------------------------- measurement


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return (time.perf_counter() - t) * 1e3, out


class StepClock(transformers.LogitsProcessor):
    """Stamps the host time at each decoding step: `generate` calls logits processors once per new token."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(time.perf_counter())
        return scores

    def median_ms(self) -> float | None:
        """The median interval between successive steps, in ms (None with fewer than two steps)."""
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return statistics.median(gaps) * 1e3 if gaps else None


def generate(model, ids, new: int, static: bool, clock: StepClock | None = None):
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    if clock is not None:
        kwargs["logits_processor"] = transformers.LogitsProcessorList([clock])
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)


def decode_ms(model, ids, new: int, static: bool, reps: int) -> tuple[float, float, list[float], torch.Tensor]:
    """(ms per new token, ms of the first call, each rep's median step interval in ms, the new tokens).

    The first call, a full generate, warms up: under the static cache it compiles the decoding step and
    sets the cache length that later calls reuse; with the dynamic cache it meets every key length once
    (cuDNN's SDPA builds a plan for each new shape, which would otherwise count in the first variant).
    Each long generate also runs a `StepClock`: under the static cache every `generate` call makes new
    cache tensors, so its compiled step re-records its CUDA graphs at its first steps, a cost that
    varies from call to call and that the (long - short) difference does not always cancel; the median
    step interval leaves those steps out.
    """
    first, _ = timed(lambda: generate(model, ids, new, static))
    best, out, steps = float("inf"), None, []
    for _ in range(reps):
        clock = StepClock()
        long_ms, out = timed(lambda: generate(model, ids, new, static, clock))
        short_ms, _ = timed(lambda: generate(model, ids, SHORT, static))
        best = min(best, (long_ms - short_ms) / (new - SHORT))
        steps.append(clock.median_ms())
    return best, first, steps, out[:, ids.shape[1] :].cpu()


def same_tokens(a: torch.Tensor | None, b: torch.Tensor | None) -> str:
    if a is None or b is None:
        return "—"
    if torch.equal(a, b):
        return "yes"
    differ = (a != b).any(1)
    step = int((a != b).any(0).int().argmax())
    return f"no ({int(differ.sum())}/{a.shape[0]} rows; first at step {step})"


def configurations(args) -> list[tuple[str, int, int, str]]:
    """(mode, batch, prompt, variant) in the order they run: every dynamic one, then the static ones
    variant by variant (unpatched first), so that a time budget cuts the last variants."""
    out = [("dynamic", b, t, v) for b, t in args.batches for v in args.variants] if "dynamic" in args.modes else []
    if "static" in args.modes:
        out += [("static", b, t, v) for v in args.static_variants for b, t in args.static_batches]
    return out


def _spans(batch: int, length: int):
    return [[(100, 196), (length, 2**62)]] * batch  # PASTA: one highlighted span; generated tokens unbiased


def variant(model, recipe_of: dict, name: str, batch: int, length: int) -> Variant:
    """The context for variant `name` on prompts of this shape (PASTA gets its highlighted span)."""
    return Variant(model, name, recipe_of.get(name), _spans(batch, length) if name == "pasta" else None)


def _failed(row: dict, e: Exception) -> dict:
    """Record a variant that fails in this mode; the run goes on."""
    row.update(ms_per_token=None, error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}")
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def measure_one(model, args, recipe_of, mode, batch, length, name, dynamic_tokens) -> dict:
    """One variant on its own (the static cache: each variant compiles its decoding step)."""
    ids, _, _ = prompts(batch, length, args.device)
    static = mode == "static"
    row = {"batch": batch, "prompt": length, "mode": mode, "variant": name}
    torch._dynamo.reset()
    try:
        with variant(model, recipe_of, name, batch, length):
            ms, first, steps, tokens = decode_ms(model, ids, args.new_tokens, static, args.reps)
        row.update(ms_per_token=ms, first_call_ms=first, step_medians=steps, step_median_ms=min(steps))
        if static:
            row["same_tokens"] = same_tokens(dynamic_tokens.get((batch, length, name)), tokens)
        else:
            dynamic_tokens[(batch, length, name)] = tokens
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        _failed(row, e)
    return row


def measure_rounds(model, args, recipe_of, batch, length, names, dynamic_tokens, out_of_time) -> list[dict]:
    """Dynamic cache: every variant warmed once, then `args.reps` rounds in which each variant is timed in turn.

    A round times one (generate(new) - generate(8)) pair per variant, the variants one after the other,
    so that a machine whose speed drifts during the run (other tenants, clocks) slows them alike; a
    variant's figure is its best round, and each round's ratio to that round's unpatched SDPA is kept
    (`round_ratios`) to show the spread. Rounds stop early when `out_of_time()` (at least one runs).
    """
    ids, _, _ = prompts(batch, length, args.device)
    rows = {n: {"batch": batch, "prompt": length, "mode": "dynamic", "variant": n, "rounds": []} for n in names}
    live = []
    for n in names:
        if out_of_time():
            rows[n].update(ms_per_token=None, error=f"not run: the run's time budget ({args.budget_s:.0f} s) was spent")
            continue
        t = time.time()
        try:
            with variant(model, recipe_of, n, batch, length):
                first, out = timed(lambda: generate(model, ids, args.new_tokens, False))
            rows[n]["first_call_ms"] = first
            dynamic_tokens[(batch, length, n)] = out[:, ids.shape[1] :].cpu()
            live.append(n)
        except Exception as e:  # noqa: BLE001
            _failed(rows[n], e)
        print(f"  b{batch} p{length} dynamic {n}: warmed ({time.time() - t:.0f}s)", file=sys.stderr, flush=True)
    for r in range(max(1, args.reps)):
        if r and out_of_time():
            break
        for n in list(live):
            try:
                clock = StepClock()
                with variant(model, recipe_of, n, batch, length):
                    long_ms, _ = timed(lambda: generate(model, ids, args.new_tokens, False, clock))
                    short_ms, _ = timed(lambda: generate(model, ids, SHORT, False))
                rows[n]["rounds"].append((long_ms - short_ms) / (args.new_tokens - SHORT))
                rows[n].setdefault("step_medians", []).append(clock.median_ms())
            except Exception as e:  # noqa: BLE001
                _failed(rows[n], e)
                live.remove(n)
        line = ", ".join(f"{n} {rows[n]['rounds'][-1]:.2f}" for n in live)
        print(f"  b{batch} p{length} dynamic round {r + 1}: {line} ms/token", file=sys.stderr, flush=True)
    base = rows.get("sdpa", {}).get("rounds")
    step_base = rows.get("sdpa", {}).get("step_medians")
    for n in live:
        rs = rows[n]["rounds"]
        rows[n]["ms_per_token"] = min(rs)
        if base and len(base) >= len(rs):
            rr = rows[n]["round_ratios"] = [x / b for x, b in zip(rs, base)]
            rows[n]["median_round_ratio"] = statistics.median(rr)  # robust to one disturbed round
        steps = rows[n]["step_medians"]
        rows[n]["step_median_ms"] = min(steps)
        if step_base and len(step_base) >= len(steps):
            rows[n]["step_median_ratio"] = statistics.median([x / b for x, b in zip(steps, step_base)])
    return [rows[n] for n in names]


def measure_abba(model, args, recipe_of, batch, length, rows: list[dict], out_of_time) -> None:
    """Dynamic cache, `--abba N`: each patched variant against unpatched SDPA in N quads of short generates.

    A quad runs generate(`--abba-tokens`) four times, SDPA, the variant, the variant, SDPA, each with a
    `StepClock`; its ratio is the variant's two median step intervals over SDPA's two. The four calls
    take a few seconds, so a machine whose speed drifts within a round (this is what spreads the
    rounds' ratios) slows both sides of a quad alike, and a linear drift cancels in the ABBA order.
    Each row gets `abba_ratios` (one per quad), their median `abba_ratio` and quartiles `abba_iqr`.
    Quads stop early when `out_of_time()`; a variant gets at least one. A variant that fails gets
    `abba_error` instead, and the others go on.
    """
    ids, _, _ = prompts(batch, length, args.device)
    new = args.abba_tokens

    def step_ms(name: str) -> float:
        clock = StepClock()
        with variant(model, recipe_of, name, batch, length):
            generate(model, ids, new, False, clock)
        return clock.median_ms()

    for row in rows:
        name = row["variant"]
        if name == "sdpa" or not row.get("ms_per_token") or row["batch"] != batch or row["prompt"] != length:
            continue
        quads = []
        try:
            for q in range(args.abba):
                if q and out_of_time():
                    break
                s1, v1, v2, s2 = step_ms("sdpa"), step_ms(name), step_ms(name), step_ms("sdpa")
                quads.append((v1 + v2) / (s1 + s2))
        except Exception as e:  # noqa: BLE001 - recorded, the run goes on
            row["abba_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"
            print(f"  b{batch} p{length} dynamic abba {name}: fails: {row['abba_error']}", file=sys.stderr, flush=True)
            continue
        row["abba_ratios"] = quads
        row["abba_ratio"] = statistics.median(quads)
        if len(quads) >= 2:
            q1, _, q3 = statistics.quantiles(quads, n=4, method="inclusive")
            row["abba_iqr"] = [q1, q3]
        print(
            f"  b{batch} p{length} dynamic abba {name}: median {row['abba_ratio']:.3f} over {len(quads)} quads",
            file=sys.stderr,
            flush=True,
        )


def ratios(rows: list[dict]) -> None:
    """Each row's ratio to unpatched SDPA of its batch, in its own cache mode and with the dynamic cache."""
    for r in rows:
        same = [x for x in rows if x["batch"] == r["batch"] and x["prompt"] == r["prompt"] and x["variant"] == "sdpa"]
        base = {x["mode"]: x["ms_per_token"] for x in same}
        ms = r["ms_per_token"]
        r["ratio"] = ms / base[r["mode"]] if ms and base.get(r["mode"]) else None
        r["ratio_to_dynamic"] = ms / base["dynamic"] if ms and base.get("dynamic") else None
        if r["mode"] == "static":  # static variants run one after the other: best median step over SDPA's
            sdpa = [x.get("step_median_ms") for x in same if x["mode"] == "static"]
            step = r.get("step_median_ms") if ms else None
            r["step_median_ratio"] = step / sdpa[0] if step and sdpa and sdpa[0] else None


def prefill_call(model, length: int, device: str):
    """(fwd, spans): one prefill of a `length`-token prompt (logits of its last token) and PASTA's span for it."""
    ids, _, _ = prompts(1, length, device, seed=1)

    def fwd():
        with torch.no_grad():
            return model(ids, logits_to_keep=1).logits

    return fwd, [[(length // 4, length // 4 + 96), (length, 2**62)]]


def run_prefill(model, args, recipe_of) -> list[dict]:
    """End to end prefill of one long prompt (logits of the last token): throughput against unpatched SDPA."""
    from triton.testing import do_bench  # noqa: PLC0415  (Triton: CUDA machines only)

    N = args.e2e_tokens
    fwd, spans = prefill_call(model, N, args.device)
    rows = []
    names = ["sdpa"] + [v for v in args.variants if v not in ("sdpa", "eager")]
    if "vhr" in names:  # VHR's runtime alone: the heads given, as after the per-input choice
        names.insert(names.index("vhr") + 1, "vhr_heads")
    for name in names:
        try:
            with Variant(model, name, recipe_of.get(name), spans if name == "pasta" else None):
                fwd()
                ms = do_bench(fwd, warmup=100, rep=1500, return_mode="median")
            rows.append({"variant": name, "ms": ms})
        except Exception as e:  # recorded, the run goes on
            rows.append({"variant": name, "ms": None, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"})
        print(f"  prefill {N} {name:11s} {rows[-1]['ms']} ms", file=sys.stderr, flush=True)
    base = rows[0]["ms"]
    for r in rows:
        r["tokens_per_s"] = N / r["ms"] * 1e3 if r["ms"] else None
        r["throughput_ratio"] = base / r["ms"] if r["ms"] and base else None
        r["target"] = 0.90 if r["variant"] == "act" else 0.98
        if r["variant"] == "vhr":  # two forwards by the paper's construction: no runtime target
            r["target"] = None
            r["floor"] = N / (2 * N - image_block(N)[1])  # the text-only prefill's share, in tokens
    return rows


# --------------------------------------------------------------------------- report


def fmt(x, p=2) -> str:
    return "—" if x is None else f"{x:.{p}f}"


def _spread(row: dict) -> str:
    """The per-round ratios of a dynamic-cache row: 'lo-hi, median m (n rounds)'."""
    rr = row.get("round_ratios")
    if not rr:
        return ""
    if len(rr) == 1:
        return f"{rr[0]:.2f} (1)"
    return f"{min(rr):.2f}-{max(rr):.2f}, median {statistics.median(rr):.2f} ({len(rr)})"


def _steps(row: dict) -> str:
    """A row's median interval between decoding steps: best round (static cache: best rep), and its ratio
    to unpatched SDPA's (dynamic cache: the median of the rounds' ratios; static: of the best reps)."""
    if row.get("step_median_ms") is None:
        return ""
    return f"{row['step_median_ms']:.2f} ({fmt(row.get('step_median_ratio'))})"


def tables(rows: list[dict], prefill: list[dict], args) -> str:
    out = [
        "| batch x prompt | cache | variant | ms / new token | x unpatched (same cache) | x unpatched dynamic | "
        "rounds: x unpatched in each, range and median | median step: ms, best round or rep (x unpatched: "
        "median of rounds; static: best over best) "
        "| same tokens as dynamic |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {v: i for i, v in enumerate(VARIANTS)}
    for r in sorted(rows, key=lambda r: (-r["prompt"], r["batch"], r["mode"], order[r["variant"]])):
        ms = fmt(r["ms_per_token"]) if r["ms_per_token"] else r.get("error", "")
        ms = f"fails: {ms}" if not r["ms_per_token"] and not ms.startswith("not run") else ms
        out.append(
            f"| {r['batch']} x {r['prompt']} | {r['mode']} | {r['variant']} | {ms} | {fmt(r['ratio'])} | "
            f"{fmt(r['ratio_to_dynamic'])} | {_spread(r)} | {_steps(r)} | {r.get('same_tokens', '')} |"
        )
    paired = [r for r in rows if r.get("abba_ratios") or r.get("abba_error")]
    if paired:
        out += [
            "",
            f"| batch x prompt | variant | ABBA quads of generate({args.abba_tokens}) | median step ratio to unpatched "
            "SDPA, median of quads | quartiles |",
            "|---|---|---|---|---|",
        ]
        for r in sorted(paired, key=lambda r: (-r["prompt"], r["batch"], order[r["variant"]])):
            if r.get("abba_error"):
                out.append(f"| {r['batch']} x {r['prompt']} | {r['variant']} | fails: {r['abba_error']} | | |")
                continue
            iqr = r.get("abba_iqr")
            quartiles = f"{iqr[0]:.3f}-{iqr[1]:.3f}" if iqr else ""
            out.append(
                f"| {r['batch']} x {r['prompt']} | {r['variant']} | {len(r['abba_ratios'])} | "
                f"{fmt(r['abba_ratio'], 3)} | {quartiles} |"
            )
    if prefill:
        out += [
            "",
            f"| end to end, {args.e2e_tokens}-token prefill | ms | tokens/s | x unpatched throughput | target |",
            "|---|---|---|---|---|",
        ]
        for r in prefill:
            ms = fmt(r["ms"], 1) if r["ms"] else f"fails: {r.get('error', '')}"
            if r["variant"] == "sdpa" or r["throughput_ratio"] is None:
                ok = ""
            elif r.get("target") is None:  # VHR as the paper runs it: a second, text-only prefill per input
                ok = f"none: two prefills per input (the text-only one's floor, by tokens: {r['floor']:.3f})"
            else:
                ok = f">= {r['target']:.2f}: {'met' if r['throughput_ratio'] >= r['target'] else 'not met'}"
            out.append(
                f"| {r['variant']} | {ms} | {fmt(r['tokens_per_s'], 0)} | {fmt(r['throughput_ratio'], 3)} | {ok} |"
            )
    return "\n".join(out)


def device_line() -> str:
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, python {platform.python_version()}"
    if not torch.cuda.is_available():
        return f"CPU; {versions}"
    import triton  # noqa: PLC0415  (Triton: CUDA machines only)

    p = torch.cuda.get_device_properties(0)
    return (
        f"{p.name}, {p.multi_processor_count} SMs; {versions}, triton {triton.__version__}, CUDA {torch.version.cuda}"
    )


def pairs(text: str) -> list[tuple[int, int]]:
    """'1x2048,16x512' -> [(1, 2048), (16, 512)]."""
    out = []
    for part in filter(None, text.split(",")):
        b, _, t = part.partition("x")
        try:
            batch, length = int(b), int(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is not BATCHxPROMPT (e.g. 1x2048)") from None
        if batch < 1 or length < 1:
            raise argparse.ArgumentTypeError(f"{part!r}: batch and prompt length must be at least 1")
        out.append((batch, length))
    if not out:
        raise argparse.ArgumentTypeError("give at least one BATCHxPROMPT (e.g. 1x2048)")
    return out


def names(text: str) -> list[str]:
    out = [v for v in filter(None, text.split(","))]
    bad = [v for v in out if v not in VARIANTS]
    if bad:
        raise SystemExit(f"error: unknown variants {bad}; allowed: {', '.join(VARIANTS)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="folder for generate.md and generate.json")
    ap.add_argument("--tag", default="generate", help="file name stem under --out")
    ap.add_argument("--shape", choices=SHAPES, default="llama3.1-8b")
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (fewer for quick runs)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--batches", type=pairs, default=pairs("1x2048,16x512"), help="BATCHxPROMPT, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--modes", default="dynamic,static")
    ap.add_argument("--variants", type=names, default=list(VARIANTS))
    ap.add_argument("--static-variants", type=names, help="variants measured with the static cache (default: all)")
    ap.add_argument("--static-batches", type=pairs, help="BATCHxPROMPT measured with the static cache (default: all)")
    ap.add_argument(
        "--reps",
        type=int,
        default=3,
        help="dynamic cache: rounds over all variants; static cache: timed pairs per variant (the best counts)",
    )
    ap.add_argument(
        "--abba",
        type=int,
        default=0,
        help="dynamic cache: also compare each variant with unpatched SDPA in this many ABBA quads of short generates",
    )
    ap.add_argument("--abba-tokens", type=int, default=32, help="new tokens of each generate in an ABBA quad")
    ap.add_argument("--e2e-tokens", type=int, default=8192, help="prompt of the end-to-end prefill (0: skip)")
    ap.add_argument("--budget-s", type=float, default=0, help="skip configurations once this many seconds passed")
    ap.add_argument("--compile-s", type=float, default=60, help="time a static-cache configuration is expected to take")
    args = ap.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    args.static_variants = args.static_variants or args.variants
    args.static_batches = args.static_batches or args.batches
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.new_tokens <= SHORT:
        raise SystemExit(f"error: --new-tokens must be larger than {SHORT}")
    if args.reps < 1:
        raise SystemExit(f"error: --reps must be at least 1, got {args.reps}")
    if args.abba < 0:
        raise SystemExit(f"error: --abba must be 0 (off) or more quads, got {args.abba}")
    if args.abba and args.abba_tokens < 3:
        raise SystemExit(f"error: --abba-tokens must be at least 3 (two step intervals), got {args.abba_tokens}")
    if args.abba and "dynamic" not in args.modes:
        raise SystemExit("error: --abba times the dynamic cache: include dynamic in --modes")
    if args.abba and "sdpa" not in args.variants:
        raise SystemExit("error: --abba compares with unpatched SDPA: include sdpa in --variants")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch._dynamo.config.cache_size_limit = 64
    print(device_line(), flush=True)
    start = time.time()
    model = build_model(args.shape, args.layers, getattr(torch, args.dtype), args.device)
    recipe_of = recipes(args.layers, model.config.num_attention_heads, model.config.hidden_size)
    meta = {
        "command": "python " + " ".join(sys.argv),
        "device": device_line(),
        "shape": args.shape,
        "layers": args.layers,
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "recipes": {k: r.to_dict() for k, r in recipe_of.items()},
    }
    rows, prefill, tokens = [], [], {}
    todo = configurations(args)
    for phase in ("dynamic", "prefill", "static"):
        if phase == "prefill":
            if args.e2e_tokens and args.device == "cuda":
                prefill = run_prefill(model, args, recipe_of)
                report(args, meta, rows, prefill)
            continue
        if phase == "dynamic":
            for batch, length in args.batches if "dynamic" in args.modes else []:

                def out_of_time():
                    return bool(args.budget_s) and time.time() - start > args.budget_s

                rows += measure_rounds(model, args, recipe_of, batch, length, args.variants, tokens, out_of_time)
                ratios(rows)
                report(args, meta, rows, prefill)
                if args.abba:
                    measure_abba(model, args, recipe_of, batch, length, rows, out_of_time)
                    report(args, meta, rows, prefill)
            continue
        for mode, batch, length, name in [c for c in todo if c[0] == phase]:
            t = time.time()
            if args.budget_s and t - start + (args.compile_s if mode == "static" else 0) > args.budget_s:
                row = {"batch": batch, "prompt": length, "mode": mode, "variant": name, "ms_per_token": None}
                row["error"] = f"not run: the run's time budget ({args.budget_s:.0f} s) was spent"
            else:
                row = measure_one(model, args, recipe_of, mode, batch, length, name, tokens)
            note = f"{row['ms_per_token']:.2f} ms/token" if row["ms_per_token"] else row.get("error")
            print(f"  b{batch} p{length} {mode} {name}: {note} ({time.time() - t:.0f}s)", file=sys.stderr, flush=True)
            rows.append(row)
            ratios(rows)
            report(args, meta, rows, prefill)
    print(tables(rows, prefill, args))


def report(args, meta: dict, rows: list[dict], prefill: list[dict]) -> None:
    """Write what was measured so far (a run cut short still leaves its table)."""
    if not args.out:
        return
    args.out.mkdir(parents=True, exist_ok=True)
    text = tables(rows, prefill, args)
    (args.out / f"{args.tag}.json").write_text(json.dumps({**meta, "generate": rows, "prefill": prefill}, indent=1))
    (args.out / f"{args.tag}.md").write_text(f"`{meta['command']}`\n\n{meta['device']}\n\n{text}\n")


if __name__ == "__main__":
    main()
