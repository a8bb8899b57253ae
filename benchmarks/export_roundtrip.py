"""Export round trips on the default model: time to export and load, and how close the loaded model is.

    OMP_NUM_THREADS=1 python benchmarks/export_roundtrip.py

Prints a markdown table: export and attnedit.load times (CPU, fp32), the relative logits error
(norm of the difference over norm, real tokens only) of the export loaded by attnedit against the
patched model in memory, of plain transformers against the folded part alone, and whether 12
greedy tokens match. Figures and the machine they came from are kept in docs/export.md.
"""

import shutil
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM

import attnedit

model, tok = attnedit.load("smollm2-135m-instruct", dtype="float32", device="cpu")
tok.padding_side = "left"
enc = tok(
    ["The capital of France is", "Review: a gorgeous, witty, seductive movie. Sentiment:"],
    return_tensors="pt",
    padding=True,
)
m = enc.attention_mask.bool()


def rel(a, b):
    return ((a[m] - b[m]).norm() / b[m].norm()).item()


recipes = {
    "static (head_prune, 5 heads)": "interventions: [{type: head_prune, heads: {3: [1, 4], 12: [0], 20: [3, 8]}}]",
    "mixed (+ zerotuning, act)": "interventions: [{type: head_prune, heads: {3: [1, 4], 12: [0], 20: [3, 8]}}, "
    "{type: zerotuning, gamma: 2.0, layers: '10:'}, {type: act}]",
}
print(
    "| recipe | export s | load s (attnedit) | logits rel. err. (attnedit.load) | logits rel. err. (plain "
    "transformers, folded part) | 12 greedy tokens equal |"
)
print("|---|---|---|---|---|---|")
for name, text in recipes.items():
    r = attnedit.Recipe.from_str(text)
    with torch.no_grad(), attnedit.patch(model, r, backend="reference"):
        want = model(**enc).logits
        want_tok = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    out = tempfile.mkdtemp() + "/x"
    t = time.perf_counter()
    attnedit.export(model, r, out, tokenizer=tok)
    t_exp = time.perf_counter() - t
    t = time.perf_counter()
    m2, _ = attnedit.load(out, dtype="float32", device="cpu")
    t_load = time.perf_counter() - t
    if hasattr(m2, "attnedit_patch"):
        m2.attnedit_patch.backend = "reference"
    with torch.no_grad():
        got = m2(**enc).logits
        toks = m2.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        p = plain(**enc).logits
        if hasattr(m2, "attnedit_patch"):
            m2.attnedit_patch.remove()
            folded_only = m2(**enc).logits
        else:
            folded_only = want
    print(
        f"| {name} | {t_exp:.2f} | {t_load:.2f} | {rel(got, want):.1e} | {rel(p, folded_only):.1e} | "
        f"{torch.equal(toks, want_tok)} |"
    )
    shutil.rmtree(out)
