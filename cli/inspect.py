"""attnedit inspect: where each head's attention goes, and which tokens are sinks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .common import (
    CacheOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    UsageError,
    check_device,
    check_writable,
    console,
    err_console,
    load_model,
    load_recipe,
    show,
    write_atomic,
)

COMMAND = "inspect"
ORDER = 26


def run(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The text to inspect.")],
    model: ModelOpt = None,
    recipe: Annotated[str | None, typer.Option(help="Also inspect the model patched with this recipe.")] = None,
    tau: Annotated[float, typer.Option(min=0.0, max=1.0, help="Column-score threshold for sinks (ACT's rule).")] = 0.1,
    chat: Annotated[
        bool | None, typer.Option("--chat/--no-chat", help="Wrap the prompt in the chat template.")
    ] = False,
    png: Annotated[Path, typer.Option(help="Where to write the heat map.")] = Path("attnedit_inspect.png"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite --png if it exists.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print per-head figures as JSON instead of the table.")
    ] = False,
    dtype: DtypeOpt = "float32",
    device: DeviceOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Per layer and head: attention mass on the first token, on detected sink tokens and on the rest; a heat map."""
    import torch  # noqa: PLC0415

    import attnedit  # noqa: PLC0415
    from attnedit.loading import DEFAULT_MODEL  # noqa: PLC0415
    from attnedit.prompting import render  # noqa: PLC0415
    from attnedit.recipe import Recipe  # noqa: PLC0415

    if not prompt.strip():
        raise UsageError("--prompt is empty; give the text to inspect")
    check_writable(png, force, "--png")
    check_device(device)
    rec = load_recipe(recipe) if recipe else None
    model = model or (rec.model if rec is not None else None) or DEFAULT_MODEL
    m, tok = load_model(model, dtype, device, cache_dir)
    text = render(tok, prompt, chat)
    inner = getattr(tok, "tokenizer", tok)
    enc = inner(text, return_tensors="pt", add_special_tokens=text == prompt).to(m.device)
    if enc["input_ids"].shape[1] == 0:
        raise UsageError("--prompt encodes to no token")
    tokens = [inner.decode([int(t)]) for t in enc["input_ids"][0]]  # as text, not byte-level pieces ('ĠThe')
    runs = {"unpatched": Recipe()}
    if rec is not None:
        runs["patched"] = rec
    report = {"model": model, "recipe": recipe, "prompt": prompt, "tokens": tokens, "tau": tau}
    for label, r in runs.items():
        with torch.no_grad(), attnedit.patch(m, r, backend="reference") as p:
            p.capture = {}
            m(**enc)
            base = {row["layer"]: row for row in report.get("unpatched", [])}
            report[label] = [_layer_stats(layer, p.capture[layer], tau, base.get(layer)) for layer in sorted(p.capture)]
    _plot(report, png)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report)
    (err_console if as_json else console).print(f"wrote {png}")


def _layer_stats(layer: int, cap: dict, tau: float, sinks_of: dict | None = None) -> dict:
    """Per head: mean mass on the first token, on sinks (column score > tau), and the sink positions.

    With `sinks_of` (the unpatched figures of this layer), the sinks are those, so that a patched
    map shows what became of the unpatched model's sinks.
    """
    w = cap["weights"][0]  # (H, Q, K), one prompt
    H, Q, K = w.shape
    first = int(cap["first_key"][0])
    rows = w[:, first + 1 :, :] if Q > first + 1 else w  # rows other than the first token's own
    count = _rows_seeing(Q, K, first)
    score = w.sum(1) / count  # (H, K)
    heads = []
    for h in range(H):
        if sinks_of is not None:
            sinks = sinks_of["heads"][h]["sinks"]
        else:
            sinks = [j for j in range(first + 1, K) if float(score[h, j]) > tau]
        heads.append(
            {
                "head": h,
                "first_mass": float(rows[h, :, first].mean()),
                "sink_mass": float(rows[h][:, sinks].sum(-1).mean()) if sinks else 0.0,
                "sinks": sinks,
            }
        )
    return {"layer": layer, "heads": heads}


def _rows_seeing(Q: int, K: int, first: int):
    """Rows that may see each key in a causal map of Q rows over K keys (real rows start at `first`)."""
    import torch  # noqa: PLC0415

    j = torch.arange(K)
    return (Q - torch.clamp(j, min=first) - (K - Q)).clamp_min(1).float()


def _print_table(report: dict) -> None:
    tokens = report["tokens"]
    for label in ("unpatched", "patched"):
        if label not in report:
            continue
        which = "the unpatched model's sinks" if label == "patched" else f"sinks: column score > {report['tau']}"
        table = Table(title=f"{label}: attention mass per layer (mean over heads; {which})")
        for col in ("layer", "first token", "sinks", "rest", "sink tokens (heads)"):
            table.add_column(col, overflow="fold")
        for row in report[label]:
            heads = row["heads"]
            first = sum(h["first_mass"] for h in heads) / len(heads)
            sink = sum(h["sink_mass"] for h in heads) / len(heads)
            counts: dict[int, int] = {}
            for h in heads:
                for j in h["sinks"]:
                    counts[j] = counts.get(j, 0) + 1
            top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
            names = ", ".join(f"{tokens[j]!r}@{j} ({n})" for j, n in top)
            table.add_row(str(row["layer"]), f"{first:.2f}", f"{sink:.2f}", f"{1 - first - sink:.2f}", names)
        show(table)


def _caption(report: dict, width: int = 110) -> str:
    """The PNG's title: model, recipe and prompt (shortened to fit)."""
    prompt = " ".join(report["prompt"].split())
    head = f"{report['model']}" + (f" + {report['recipe']}" if report.get("recipe") else " (unpatched)")
    room = max(20, width - len(head) - 12)
    return f"{head}\nprompt: {prompt if len(prompt) <= room else prompt[: room - 3] + '...'}"


def _plot(report: dict, png: Path) -> None:
    import io  # noqa: PLC0415

    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    labels = [lbl for lbl in ("unpatched", "patched") if lbl in report]
    fig, axes = plt.subplots(len(labels), 2, figsize=(10, 4 * len(labels)), squeeze=False)
    for r, label in enumerate(labels):
        for c, key in enumerate(("first_mass", "sink_mass")):
            grid = [[h[key] for h in row["heads"]] for row in report[label]]
            ax = axes[r][c]
            im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{label}: {'first-token' if key == 'first_mass' else 'sink'} mass")
            ax.set_xlabel("head")
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax)
    fig.suptitle(_caption(report), fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.94 if len(labels) == 1 else 0.97))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    write_atomic(png, buf.getvalue())
