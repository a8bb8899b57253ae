"""What a person reads: the results table, the plot of differences, the run's provenance header."""

from __future__ import annotations

import datetime as dt
import io
import platform
import textwrap
from importlib import metadata
from pathlib import Path

from rich.table import Table

from attnedit.files import write_atomic


def provenance(**fields) -> dict:
    """The header of results.json: the given fields plus the date and library versions."""
    versions = {"python": platform.python_version()}
    for pkg in ("attnedit", "torch", "transformers", "accelerate", "numpy", "lm-eval"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **fields,
        "versions": versions,
        "padding_side": "left",
    }


def table(results: dict, title: str) -> Table:
    """One row per task: both runs' metric, the difference with its 95% interval, McNemar's p, time, memory."""
    t = Table(title=title, caption="difference: patched - baseline; time and peak memory: baseline / patched")
    for col in ("task", "n", "metric", "base", "patched", "diff [95% CI]", "McNemar p", "time s", "peak MB"):
        t.add_column(col, justify="left" if col in ("task", "metric") else "right", overflow="fold")
    for name, r in results["tasks"].items():
        d = r["difference"]
        lo, hi = d["ci95"]
        colour = "green" if lo > 0 else ("red" if hi < 0 else "white")
        t.add_row(
            name,
            str(r["n"]),
            r["metric"],
            f"{r['baseline']['value']:.3f}",
            f"{r['patched']['value']:.3f}",
            f"[{colour}]{d['value']:+.3f}[/]\n[{lo:+.3f}, {hi:+.3f}]",
            f"{d['mcnemar']['p']:.3g}",
            f"{r['time_s']['baseline']:.1f} /\n{r['time_s']['patched']:.1f}",
            f"{r['peak_memory_mb']['baseline']:.0f} /\n{r['peak_memory_mb']['patched']:.0f}",
        )
    return t


def plot(results: dict, path: Path) -> None:
    """A PNG of each task's patched-minus-baseline difference with its 95% bootstrap interval."""
    import matplotlib  # noqa: PLC0415  (heavy: only a plot needs it)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  (heavy: only a plot needs it)

    names = list(results["tasks"])
    diffs = [results["tasks"][n]["difference"] for n in names]
    values = [d["value"] for d in diffs]
    lower = [d["value"] - d["ci95"][0] for d in diffs]
    upper = [d["ci95"][1] - d["value"] for d in diffs]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 3.5))
    ax.errorbar(range(len(names)), values, yerr=[lower, upper], fmt="o", capsize=5, color="tab:blue")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(range(len(names)), [f"{n}\n({results['tasks'][n]['metric']})" for n in names], fontsize=8)
    ax.set_ylabel("patched - baseline")
    title = f"{results.get('recipe_name') or 'recipe'} on {Path(str(results.get('model'))).name}: difference, 95% CI"
    ax.set_title(textwrap.fill(title, width=int(fig.get_figwidth() * 12)), fontsize=9)  # ~12 chars an inch at 9 pt
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
