"""The paired run behind `attnedit eval`: baseline and patched on the same batches, resumable, shardable.

Per task, the examples are encoded once and grouped into fixed batches
(`plan_batches`). Each batch is scored unpatched, then patched, and written as
one JSON line to ``DIR/.work/<task>.rank<R>.jsonl`` (flushed to disk), so an
interrupted run resumes at the first missing batch and gets the same numbers.
With several processes (``accelerate launch``), process R takes batches
R, R + W, R + 2W, ...; process 0 waits for the others and merges the lines into
``samples_<task>.jsonl`` and ``results.json`` (each written through a temporary
file, never half-written).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from attnedit.files import slug, write_atomic

from .prompts import Encoded
from .records import _bar as bar
from .records import encode_for, metric, per_example, score_batch
from .scoring import patched, plan_batches
from .spec import TaskError
from .stats import N_BOOTSTRAP, f1_diff_interval, mcnemar, mean_diff_interval
from .task import Example, Task

WORK = ".work"


@dataclass
class Settings:
    """What a run depends on; two runs with equal settings give equal numbers."""

    shots: int = 0
    seed: int = 0
    batch_size: int = 8
    limit: int | None = None
    chat: bool | None = None
    backend: str | None = None
    n_boot: int = N_BOOTSTRAP
    identity: dict = field(default_factory=dict)  # model, recipe hash, dtype, ...: checked on resume


def examples_of(task: Task, limit: int | None) -> list[Example]:
    """The reported examples: the test split's first `limit` (all when None)."""
    test = task.split("test")
    return test if limit is None else test[:limit]


def run_tasks(
    model,
    tokenizer,
    recipe,
    tasks: Sequence[Task],
    out: Path,
    settings: Settings,
    *,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
    barrier=None,
) -> dict | None:
    """Score every task baseline vs patched, resuming from `out`; process 0 returns the merged results.

    Args:
        model, tokenizer: the loaded model and tokenizer (or processor).
        recipe: the `Recipe` to compare against the unpatched model.
        tasks: loaded tasks.
        out: the output folder (created; its `.work` holds the resumable lines).
        settings: shots, seed, batch size, limit, chat, backend, bootstrap resamples, run identity.
        rank, world, barrier: this process's index, the number of processes, and a function that waits
            for all of them (accelerate's ``wait_for_everyone``).
        progress: show progress bars.
    Returns:
        The results dict (as written to results.json) on process 0; None on the others.
    """
    work = out / WORK
    if rank == 0:
        claim(out, settings.identity)
    if barrier is not None:
        barrier()
    patch = patched(model, recipe, settings.backend)
    meter = Meter(next(model.parameters()).device)
    for task in tasks:
        examples = examples_of(task, settings.limit)
        items = encode_for(task, examples, tokenizer, shots=settings.shots, seed=settings.seed, chat=settings.chat)
        batches = plan_batches(items, settings.batch_size)
        done = completed(work, task.name, len(batches))
        todo = [k for k in range(len(batches)) if k % world == rank and k not in done]
        path = _work_file(work, task.name, rank)
        repair(path)
        with _bar(progress and bool(todo), len(todo), task.name) as advance, open(path, "a", encoding="utf-8") as f:
            for k in todo:
                line = _score_pair(
                    model, tokenizer, task, examples, [items[i] for i in batches[k]], patch, meter, settings.batch_size
                )
                f.write(json.dumps({"batch": k, **line}) + "\n")
                f.flush()
                os.fsync(f.fileno())
                advance()
    meter.stop()
    if barrier is not None:
        barrier()
    if rank != 0:
        return None
    return merge(tasks, out, settings)


def _score_pair(model, tokenizer, task, examples, items: list[Encoded], patch, meter, chunk) -> dict:
    """Score one batch unpatched then patched; its records, times and peak memory."""
    with meter.phase("baseline"):
        base = score_batch(model, tokenizer, task, examples, items, chunk)
    with meter.phase("patched"), patch:
        edit = score_batch(model, tokenizer, task, examples, items, chunk)
    rows = [
        {"index": it.index, "prompt": it.prompt, "baseline": b, "patched": e} for it, b, e in zip(items, base, edit)
    ]
    return {"rows": rows, "time_s": meter.last_time(), "peak_memory_mb": meter.last_peak()}


# --------------------------------------------------------------------------- the work folder


def claim(out: Path, identity: dict) -> None:
    """Create `out/.work` for this run, or check that what is there came from the same settings."""
    work = out / WORK
    stamp = work / "run.json"
    if stamp.is_file():
        before = json.loads(stamp.read_text(encoding="utf-8"))
        diff = sorted(k for k in set(before) | set(identity) if before.get(k) != identity.get(k))
        if diff:
            detail = "; ".join(f"{k}: {before.get(k)!r} then, {identity.get(k)!r} now" for k in diff[:4])
            raise TaskError(
                f"{out} holds a run with other settings ({detail}); use another --out, or --force to start over"
            )
        return
    work.mkdir(parents=True, exist_ok=True)
    tmp = stamp.with_suffix(".tmp")
    tmp.write_text(json.dumps(identity, indent=2, sort_keys=True), encoding="utf-8")
    os.replace(tmp, stamp)


def clear(out: Path) -> None:
    """Forget a previous run in `out` (--force): its work folder and result files."""
    shutil.rmtree(out / WORK, ignore_errors=True)
    for pattern in ("results.json", "samples_*.jsonl", "differences.png"):
        for p in out.glob(pattern):
            p.unlink()


def _work_file(work: Path, task: str, rank: int) -> Path:
    return work / f"{slug(task)}.rank{rank}.jsonl"


def read_lines(work: Path, task: str) -> dict[int, dict]:
    """Complete batch lines of a task from every process's work file; a torn last line is ignored."""
    lines: dict[int, dict] = {}
    for path in sorted(work.glob(f"{slug(task)}.rank*.jsonl")):
        for raw in path.read_text(encoding="utf-8").splitlines():
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: that batch runs again
            lines[line["batch"]] = line
    return lines


def repair(path: Path) -> None:
    """Drop a torn last line (an interrupted write) so that new lines start clean."""
    if not path.is_file():
        return
    raw = path.read_text(encoding="utf-8")
    good = []
    for line in raw.splitlines():
        try:
            json.loads(line)
            good.append(line + "\n")
        except json.JSONDecodeError:
            pass
    if "".join(good) != raw:
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(good), encoding="utf-8")
        os.replace(tmp, path)


def completed(work: Path, task: str, n_batches: int) -> set[int]:
    return {k for k in read_lines(work, task) if k < n_batches}


# --------------------------------------------------------------------------- merging and statistics


def merge(tasks: Sequence[Task], out: Path, settings: Settings) -> dict:
    """Join every process's lines into samples files and the results dict (written to results.json)."""

    results: dict[str, Any] = {}
    for task in tasks:
        examples = examples_of(task, settings.limit)
        lines = read_lines(out / WORK, task.name)
        rows = sorted((r for line in lines.values() for r in line["rows"]), key=lambda r: r["index"])
        if [r["index"] for r in rows] != list(range(len(examples))):
            raise TaskError(
                f"task {task.name!r}: the work files in {out / WORK} miss some batches; run the same command again"
            )
        samples = [_sample(examples[r["index"]], r) for r in rows]
        write_atomic(
            out / f"samples_{slug(task.name)}.jsonl",
            "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples),
        )
        results[task.name] = summarize(task, rows, list(lines.values()), settings)
    return results


def _sample(ex: Example, row: dict) -> dict:
    return {
        "index": row["index"],
        "id": ex.id,
        "fields": {k: v for k, v in ex.fields.items() if k not in ("choices", "gold")},
        "choices": list(ex.choices),
        "gold": list(ex.gold),
        "targets": list(ex.targets),
        "prompt": row.get("prompt"),
        "baseline": row["baseline"],
        "patched": row["patched"],
    }


def summarize(task: Task, rows: list[dict], lines: list[dict], settings: Settings) -> dict:
    """Per-task figures: both runs' metrics, the paired difference with its interval and McNemar's test."""
    base = [r["baseline"] for r in rows]
    edit = [r["patched"] for r in rows]
    mb, me = metric(base, task), metric(edit, task)
    name = task.metric
    kw = dict(n_boot=settings.n_boot, seed=settings.seed)
    if name == "macro_f1":
        gold = [r["gold"][0] for r in base]
        ci = f1_diff_interval(gold, [r["pred"] for r in base], [r["pred"] for r in edit], len(task.labels), **kw)
    else:
        ci = mean_diff_interval(per_example(base, name), per_example(edit, name), **kw)
    test = mcnemar(per_example(base, name), per_example(edit, name))
    return {
        "kind": task.kind,
        "metric": name,
        "n": len(rows),
        "baseline": mb,
        "patched": me,
        "difference": {"value": me["value"] - mb["value"], "ci95": list(ci), "mcnemar": test},
        "time_s": {side: round(sum(line["time_s"][side] for line in lines), 3) for side in ("baseline", "patched")},
        "peak_memory_mb": {
            side: max(line["peak_memory_mb"][side] for line in lines) for side in ("baseline", "patched")
        },
        "spec": task.spec.model_dump(mode="json", exclude_none=True),
    }


# --------------------------------------------------------------------------- time and memory


class Meter:
    """Wall time and peak memory of each phase: CUDA's peak allocation, or the process's peak RSS on CPU."""

    kind = "process_rss"

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "process_rss"
        self._time: dict[str, float] = {}
        self._peak: dict[str, float] = {}
        self._phase: str | None = None
        self._stop = threading.Event()
        self._thread = None
        if not self.cuda and Path("/proc/self/statm").is_file():
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    @contextmanager
    def phase(self, name: str):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._phase, self._peak[name] = name, _rss_mb() if not self.cuda else 0.0
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
                self._peak[name] = torch.cuda.max_memory_allocated() / 2**20
            else:
                self._peak[name] = max(self._peak[name], _rss_mb())
            self._time[name] = time.perf_counter() - start
            self._phase = None

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            phase = self._phase
            if phase is not None:
                self._peak[phase] = max(self._peak.get(phase, 0.0), _rss_mb())

    def last_time(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self._time.items()}

    def last_peak(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in self._peak.items()}

    def stop(self) -> None:
        self._stop.set()


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


@contextmanager
def _bar(show: bool, total: int, label: str):
    with bar(show, total, label) as advance:
        yield lambda: advance(1)
