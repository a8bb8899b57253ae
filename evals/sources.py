"""Reading raw rows: local JSONL / CSV / TSV / line-regex files, BIG-bench JSON, Hugging Face datasets.

Every reader returns `Row`s: the row's data and where it came from
(``file:line``), so that a later problem with a row can name its line. A
malformed row stops the read with a `TaskError` naming the file and line.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnedit import hub

from .spec import Carve, HubSource, LocalSource, TaskError


@dataclass(frozen=True)
class Row:
    where: str  # "file:line" (or "file: examples[i]"), for messages and as a stable id
    data: dict[str, Any]


def resolve_path(raw: str, data_dir: Path | None, spec_dir: Path, task: str) -> Path:
    """A spec path: ``{data_dir}/...`` needs a data folder; other relative paths are beside the spec."""
    if "{data_dir}" in raw:
        if data_dir is None:
            raise TaskError(
                f"task {task!r} reads {raw}: give the data folder with --data-dir or ATTNEDIT_DATA_DIR "
                "(or, online, install `datasets` and use a task with an 'hf' source)"
            )
        return Path(raw.replace("{data_dir}", str(data_dir))).expanduser()
    path = Path(raw).expanduser()
    return path if path.is_absolute() else spec_dir / path


def need_file(path: Path, task: str, what: str = "data file") -> Path:
    if not path.exists():
        raise TaskError(f"task {task!r}: {what} not found: {path}")
    return path


def read_local(path: Path, src: LocalSource, task: str) -> list[Row]:
    """Rows of one local file in the source's format (jsonl, csv, tsv, regex)."""
    need_file(path, task)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TaskError(f"{path}: not UTF-8 text ({e})") from None
    if src.format == "jsonl":
        return _jsonl(path, text)
    if src.format in ("csv", "tsv"):
        return _delimited(path, text, "," if src.format == "csv" else "\t", src)
    if src.format == "regex":
        return _regex(path, text, src.pattern or "")
    raise TaskError(f"{path}: format {src.format!r} is not a line format")  # pragma: no cover


def _jsonl(path: Path, text: str) -> list[Row]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(data, dict):
            raise TaskError(f"{path}:{n}: each line must be a JSON object, got {type(data).__name__}")
        rows.append(Row(f"{path.name}:{n}", data))
    return rows


def _delimited(path: Path, text: str, delimiter: str, src: LocalSource) -> list[Row]:
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    columns = list(src.columns) if src.columns else None
    rows = []
    for record in reader:
        n = reader.line_num
        if not record or not any(cell.strip() for cell in record):
            continue
        if columns is None:
            if src.header:
                columns = [c.strip() for c in record]
                continue
            raise TaskError(f"{path}: no header row and no 'columns' in the task spec")
        if len(record) != len(columns):
            raise TaskError(f"{path}:{n}: has {len(record)} columns, expected {len(columns)} ({', '.join(columns)})")
        rows.append(Row(f"{path.name}:{n}", dict(zip(columns, record))))
    return rows


def _regex(path: Path, text: str, pattern: str) -> list[Row]:
    rx = re.compile(pattern)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = rx.fullmatch(line.rstrip("\r\n"))
        if m is None:
            raise TaskError(f"{path}:{n}: does not match the task's pattern {pattern!r}: {line[:80]!r}")
        rows.append(Row(f"{path.name}:{n}", m.groupdict()))
    return rows


def read_bigbench(path: Path, task: str) -> tuple[dict, list[Row]]:
    """A BIG-bench task JSON: (its metadata, one row per example)."""
    need_file(path, task, "BIG-bench task file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TaskError(f"{path}: not a BIG-bench task JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise TaskError(f"{path}: a BIG-bench task JSON has an 'examples' list")
    rows = []
    for i, ex in enumerate(data["examples"]):
        where = f"{path.name}: examples[{i}]"
        if not isinstance(ex, dict) or not isinstance(ex.get("input"), str):
            raise TaskError(f"{where}: needs a string 'input'")
        if not isinstance(ex.get("target_scores"), dict) and not isinstance(ex.get("target"), (str, list)):
            raise TaskError(f"{where}: needs 'target_scores' (multiple choice) or 'target' (generation)")
        rows.append(Row(where, ex))
    meta = {k: v for k, v in data.items() if k != "examples"}
    return meta, rows


def read_hub(src: HubSource, split: str, task: str) -> list[Row]:
    """Rows of a Hugging Face dataset split (online)."""
    try:
        import datasets  # noqa: PLC0415  (optional: only hub data sets need it)
    except ImportError:
        raise TaskError(
            f"task {task!r} has no data folder (--data-dir / ATTNEDIT_DATA_DIR) and its Hugging Face source needs "
            "the `datasets` package: pip install datasets"
        ) from None
    name = getattr(src, split)
    if not hub.offline_mode() and not hub.reachable():
        raise TaskError(
            f"task {task!r} has no data folder, so it reads the Hugging Face dataset {src.id!r}, but "
            f"{hub.unreachable_reason()}.\nGive the local files instead: --data-dir DIR or ATTNEDIT_DATA_DIR "
            "(see docs/evals.md)"
        )
    try:
        ds = datasets.load_dataset(src.id, src.config, split=name)
    except Exception as e:  # network, unknown id or split: all user-facing
        raise TaskError(
            f"task {task!r}: cannot load Hugging Face dataset {src.id!r} split {name!r}: "
            f"{str(e).splitlines()[0] if str(e) else e!r}\n"
            "Offline? Read the local files instead: --data-dir DIR or ATTNEDIT_DATA_DIR (see docs/evals.md)"
        ) from None
    return [Row(f"{src.id}:{name}:{i}", dict(row)) for i, row in enumerate(ds)]


def carve(rows: list, spec: Carve) -> tuple[list, list]:
    """Split rows into (train, test) with a fixed, seeded slice; both keep the file order.

    The order is set by sha256 of ``"seed:index"``, so it never depends on a library's RNG.
    """
    n = len(rows)
    k = spec.train if isinstance(spec.train, int) else max(1, round(spec.train * n))
    k = min(k, n - 1) if n > 1 else 0
    rank = sorted(range(n), key=lambda i: hashlib.sha256(f"{spec.seed}:{i}".encode()).hexdigest())
    chosen = set(rank[:k])
    return [r for i, r in enumerate(rows) if i in chosen], [r for i, r in enumerate(rows) if i not in chosen]


def stable_pick(options: list, *key: Any) -> Any:
    """A deterministic choice from `options`, keyed by `key` (sha256, no RNG state)."""
    h = int(hashlib.sha256(":".join(map(str, key)).encode()).hexdigest(), 16)
    return options[h % len(options)]
