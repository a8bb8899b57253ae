"""A patched model split over two GPUs gives what it gives on one: prefill logits, greedy generation, eval figures.

Three checks, each under ZeroTuning, ACT, head pruning and PASTA (and unpatched):

- `shaped`: a random bf16 model in Llama-3.1-8B shape (hidden 4096, 32 heads, 8 KV heads, head_dim
  128, vocab 128256; `--layers` decoder layers), saved once and loaded twice: on GPU 0 alone, and with
  `device_map="auto"` and a `max_memory` that leaves GPU 0 room for about half of it, so accelerate puts
  layers on both GPUs. Two left-padded rows; prefill logits within bf16 tolerance and greedy tokens
  (KV cache) equal.
- `default`: the real default model (smollm2-135m-instruct, fp32) through `attnedit.load`, on GPU 0
  and split half/half by an explicit device_map (embeddings and layers 0..14 on GPU 0, layers 15..29
  and the final norm on GPU 1; the tied output head stays with the embeddings). Built-in recipes;
  logits and tokens must be equal exactly.
- `eval`: `attnedit eval` on GPU 0, with `--device-map auto` and with `--device-map` of a half/half
  file: the results.json figures (n, both runs' metrics, difference, McNemar) must be equal.

    python benchmarks/split_check.py --out DIR --data-dir ../shared/data     # needs 2 GPUs

Prints a markdown table; writes DIR/split.md and DIR/split.json. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

import attnedit
from attnedit.interventions import pasta
from attnedit.loading import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_generate  # noqa: E402  (the same model shape and recipes as the generation benchmark)

DEFAULT = "smollm2-135m-instruct"
PROMPTS = [
    "Mary is a doctor who lives in Paris. <<Answer in one word: what is Mary's job?>>",
    "The film was a gorgeous, witty ride from start to finish. <<Was the review positive or negative?>> Answer:",
]
RECIPES = ("zerotuning-paper", "act-paper", "ph3-context-smollm2", "pasta-example")


def gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f}GiB"


def compare(single: dict, split: dict, exact: bool) -> dict:
    """Logits and tokens of the two placements."""
    a, b = single["logits"], split["logits"]
    diff = float((a - b).abs().max())
    scale = float(a.abs().max())
    close = diff == 0.0 if exact else diff <= 2e-2 * scale  # bf16: ~3 significant digits
    same = torch.equal(single["tokens"], split["tokens"])
    return {
        "logits_max_abs_diff": diff,
        "logits_scale": scale,
        "logits_equal": diff == 0.0,
        "tokens_equal": same,
        "ok": bool(close and same),
    }


def run_pair(models: dict, recipe, enc: dict, spans, new: int, pad_id: int = 0) -> dict:
    """Prefill logits and greedy tokens of each placement under `recipe` (None: unpatched)."""
    out = {}
    for where, model in models.items():
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in enc.items()}
        patch = attnedit.patch(model, recipe, spans=spans) if recipe is not None else None
        if patch is not None:
            patch.apply()
        try:
            with torch.no_grad():
                logits = model(**batch).logits.float().cpu()
                tokens = model.generate(
                    **batch, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=pad_id
                )
        finally:
            if patch is not None:
                patch.remove()
        out[where] = {"logits": logits, "tokens": tokens[:, batch["input_ids"].shape[1] :].cpu()}
    return out


def placement(model) -> dict[str, str]:
    return {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}


def layer_devices(model) -> list[str]:
    return sorted({str(p.device) for layer in model.model.layers for p in layer.parameters()})


def check_shaped(args) -> list[dict]:
    """The Llama-3.1-8B-shaped random model: GPU 0 alone vs device_map='auto' with a max_memory."""
    folder = Path(tempfile.mkdtemp(prefix="attnedit-split-"))
    model = bench_generate.build_model(args.shape, args.layers, torch.bfloat16, args.gpu0)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    load = transformers.AutoModelForCausalLM.from_pretrained
    kw = dict(dtype=torch.bfloat16, attn_implementation="sdpa")
    single = load(folder, device_map={"": args.gpu0}, **kw).eval()
    limits = {0: gib(size * 0.55), 1: gib(size * 2)} if not args.cpu_dry_run else {"cpu": gib(size * 2)}
    split = load(folder, device_map="auto", max_memory=limits, **kw).eval()
    devices = layer_devices(split)
    print(f"  shaped: {args.layers} layers, {gib(size)}; split layers on {devices}", file=sys.stderr, flush=True)
    if len(devices) < 2 and not args.cpu_dry_run:
        raise SystemExit(f"device_map='auto' put every layer on {devices}: lower max_memory for GPU 0")
    B, T = 2, 256
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128000, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :17] = 0  # a left-padded row
    enc = {"input_ids": ids, "attention_mask": mask}
    spans = [[(40, 100), (T, 2**62)]] * B
    shape = bench_generate.SHAPES[args.shape]
    recipe_of = bench_generate.recipes(args.layers, shape["num_attention_heads"], shape["hidden_size"])
    rows, base = [], None
    for variant in ("unpatched", "zerotuning", "act", "head_prune", "pasta"):
        got = run_pair(
            {"single": single, "split": split},
            recipe_of.get(variant),
            enc,
            spans if variant == "pasta" else None,
            args.new_tokens,
        )
        base = got["single"]["logits"] if base is None else base
        rows.append({"check": "shaped", "variant": variant, **compare(got["single"], got["split"], exact=False)})
        rows[-1]["changed_by_patch"] = (
            None if variant == "unpatched" else not torch.equal(base, got["single"]["logits"])
        )
    rows[0]["placement"] = placement(split)
    del single, split
    torch.cuda.empty_cache()
    return rows


def half_map(n_layers: int, devices=(0, 1)) -> dict:
    """Embeddings and the first half of the layers on GPU 0, the rest and the final norm on GPU 1."""
    a, b = devices
    out = {"model.embed_tokens": a, "model.rotary_emb": a, "lm_head": a}  # lm_head: tied to the embeddings
    out |= {f"model.layers.{i}": a if i < n_layers // 2 else b for i in range(n_layers)}
    out["model.norm"] = b
    return out


def check_default(args) -> list[dict]:
    """The real default model in fp32: GPU 0 alone vs split half/half by an explicit device_map."""
    single, tok = attnedit.load(DEFAULT, dtype="float32", device=args.gpu0)
    dmap = half_map(single.config.num_hidden_layers, args.gpus)
    split, _ = attnedit.load(DEFAULT, dtype="float32", device_map=dmap)
    devices = layer_devices(split)
    print(f"  default: split layers on {devices}", file=sys.stderr, flush=True)
    tok.padding_side = "left"
    rows, base = [], None
    for name in ("unpatched",) + RECIPES:
        recipe = None if name == "unpatched" else bench_generate.builtin(name)
        spans = None
        if recipe is not None and any(s.type == "pasta" for s in recipe.interventions):
            enc, spans = pasta.prepare(tok, PROMPTS, recipe)
            enc = dict(enc)
        else:
            enc = dict(tok([p.replace("<<", "").replace(">>", "") for p in PROMPTS], return_tensors="pt", padding=True))
        got = run_pair({"single": single, "split": split}, recipe, enc, spans, args.new_tokens, tok.pad_token_id)
        base = got["single"]["logits"] if base is None else base
        rows.append({"check": "default", "variant": name, **compare(got["single"], got["split"], exact=True)})
        rows[-1]["changed_by_patch"] = None if name == "unpatched" else not torch.equal(base, got["single"]["logits"])
    rows[0]["placement"] = placement(split)
    del single, split
    torch.cuda.empty_cache()
    return rows


def check_eval(args) -> list[dict]:
    """`attnedit eval` on one GPU, with --device-map auto and with a half/half file: the same figures."""
    out = Path(tempfile.mkdtemp(prefix="attnedit-split-eval-"))
    split_file = out / "half.json"
    cfg = load_config(DEFAULT)
    split_file.write_text(json.dumps(half_map(cfg.num_hidden_layers, args.gpus)))
    base = [sys.executable, "-m", "attnedit.cli", "eval", args.eval_recipe, "--tasks", args.eval_task]
    base += ["--limit", str(args.eval_limit), "--bootstrap", "1000", "--data-dir", str(args.data_dir)]
    runs = {"one GPU": ["--device", args.gpu0], "--device-map auto": ["--device-map", "auto"]}
    runs["--device-map half.json"] = ["--device-map", str(split_file)]
    docs, rows = {}, []
    for label, extra in runs.items():
        folder = out / label.replace(" ", "_").replace("-", "").replace(".", "_")
        cmd = base + ["--out", str(folder), "--json"] + extra
        t = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        print(f"  eval {label}: exit {res.returncode} ({time.time() - t:.0f}s)", file=sys.stderr, flush=True)
        if res.returncode != 0:
            rows.append({"check": "eval", "variant": label, "ok": False, "error": res.stderr.strip()[-400:]})
            continue
        docs[label] = json.loads((folder / "results.json").read_text())
    ref = docs.get("one GPU")
    for label, doc in docs.items():
        figures = _figures(doc)
        rows.append(
            {
                "check": "eval",
                "variant": label,
                "command": doc.get("command"),
                "figures": figures,
                "device_map": doc.get("device_map"),
                "ok": ref is not None and figures == _figures(ref),
            }
        )
    return rows


def _figures(doc: dict) -> dict:
    return {
        name: {
            "n": t["n"],
            "baseline": t["baseline"]["value"],
            "patched": t["patched"]["value"],
            "difference": t["difference"]["value"],
            "mcnemar_p": t["difference"]["mcnemar"]["p"],
        }
        for name, t in doc["tasks"].items()
    }


def table(rows: list[dict]) -> str:
    out = [
        "| check | variant | logits max abs diff (of max abs) | tokens equal | patch changed logits | ok |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["check"] == "eval":
            figs = "; ".join(
                f"{k}: n {v['n']}, base {v['baseline']:.4f}, patched {v['patched']:.4f}, p {v['mcnemar_p']:.3g}"
                for k, v in (r.get("figures") or {}).items()
            )
            out.append(f"| eval | {r['variant']} | {figs or r.get('error', '')} | | | {'yes' if r['ok'] else 'NO'} |")
            continue
        diff = f"{r['logits_max_abs_diff']:.3g} (of {r['logits_scale']:.3g})"
        changed = {None: "", True: "yes", False: "no"}[r.get("changed_by_patch")]
        out.append(
            f"| {r['check']} | {r['variant']} | {diff} | {'yes' if r['tokens_equal'] else 'NO'} | {changed} | "
            f"{'yes' if r['ok'] else 'NO'} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--checks", default="shaped,default,eval")
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the Llama-3.1-8B-shaped model")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    ap.add_argument("--eval-recipe", default="act-paper")
    ap.add_argument("--eval-task", default="sst2")
    ap.add_argument("--eval-limit", type=int, default=64)
    ap.add_argument("--shape", choices=bench_generate.SHAPES, default="llama3.1-8b")
    ap.add_argument(
        "--cpu-dry-run", action="store_true", help="both placements on the CPU: runs the script, proves nothing"
    )
    args = ap.parse_args()
    args.gpus = ("cpu", "cpu") if args.cpu_dry_run else (0, 1)
    args.gpu0 = "cpu" if args.cpu_dry_run else "cuda:0"
    if torch.cuda.device_count() < 2 and not args.cpu_dry_run:
        raise SystemExit(f"error: the split check needs 2 GPUs; this machine has {torch.cuda.device_count()}")
    torch.backends.cuda.matmul.allow_tf32 = False
    checks = {"shaped": check_shaped, "default": check_default, "eval": check_eval}
    rows = []
    for name in filter(None, args.checks.split(",")):
        t = time.time()
        try:
            rows += checks[name](args)
        except Exception as e:  # a check that crashes is a failed check; the others still run
            rows.append({"check": name, "variant": "(crashed)", "ok": False, "error": f"{type(e).__name__}: {e}"[:400]})
            print(f"  {name} crashed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        print(f"  {name}: {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    text = table([r for r in rows if r["variant"] != "(crashed)"])
    crashed = [r for r in rows if r["variant"] == "(crashed)"]
    if crashed:
        text += "\n\n" + "\n".join(f"- {r['check']} crashed: {r['error']}" for r in crashed)
    command = "python " + " ".join(sys.argv)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        meta = {"command": command, "device": bench_generate.device_line(), "gpus": torch.cuda.device_count()}
        (args.out / "split.json").write_text(json.dumps({**meta, "rows": rows}, indent=1, default=str))
        (args.out / "split.md").write_text(f"`{command}`\n\n{meta['device']}, {meta['gpus']} GPUs\n\n{text}\n")
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
