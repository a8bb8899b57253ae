"""attnedit apply: generate with and without a recipe, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress
from rich.table import Table

from .common import (
    BackendOpt,
    CacheOpt,
    DeviceMapOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    check_device,
    check_writable,
    err_console,
    load_model,
    load_recipe,
    read_device_map,
    read_prompts,
    show,
    write_atomic,
)

COMMAND = "apply"
ORDER = 25


def run(
    recipe: Annotated[str, typer.Argument(help="Recipe YAML file or built-in recipe name.")],
    model: ModelOpt = None,
    prompt: Annotated[
        list[str] | None,
        typer.Option("--prompt", "-p", help="A prompt (repeatable). PASTA: mark spans with the recipe's markers."),
    ] = None,
    prompts_file: Annotated[
        Path | None, typer.Option(help="Prompts, one a line (or JSONL with a 'prompt' field).")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate per prompt (greedy).")] = 48,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch (left padded).")] = 8,
    chat: Annotated[
        bool | None,
        typer.Option("--chat/--no-chat", help="Wrap prompts in the chat template (default: if the tokenizer has one)."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="System message for the chat template.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON to this file.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite --out if it exists.")] = False,
    backend: BackendOpt = None,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = None,
    device_map: DeviceMapOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Generate with the unpatched and the patched model and show both, side by side."""
    from attnedit.loading import DEFAULT_MODEL, load_config, model_hash  # noqa: PLC0415
    from attnedit.modelinfo import ModelInfo  # noqa: PLC0415

    check_device(device)
    rec = load_recipe(recipe)
    prompts = read_prompts(prompt, prompts_file)
    if out is not None:
        check_writable(out, force)
    name = model or rec.model or DEFAULT_MODEL
    config = load_config(name, cache_dir)
    rec.check_model(ModelInfo.from_config(config, name=name))  # before loading weights
    split = read_device_map(device_map, device, config)
    m, tok = load_model(name, dtype, device, cache_dir, device_map=split)
    result = generate_both(m, tok, rec, prompts, max_new_tokens, batch_size, chat, system, backend)
    result.update(model=name, model_hash=model_hash(name, cache_dir), recipe=rec.to_dict(), recipe_hash=rec.hash())
    text = json.dumps(result, indent=2, ensure_ascii=False)
    if out is not None:
        write_atomic(out, text + "\n")
    if as_json:
        print(text)
        return
    table = Table(title=f"{recipe} on {name} (backend: {result['backend']})", show_lines=True)
    for col in ("prompt", "unpatched", "patched"):
        table.add_column(col, overflow="fold", ratio=1)
    for row in result["generations"]:
        table.add_row(row["prompt"], row["unpatched"], row["patched"])
    show(table)


def generate_both(model, tokenizer, recipe, prompts, max_new_tokens, batch_size, chat, system, backend) -> dict:
    """Greedy generations of every prompt without and with the recipe, on identical inputs."""
    import torch  # noqa: PLC0415

    import attnedit  # noqa: PLC0415
    from attnedit.prompting import render  # noqa: PLC0415

    tok = getattr(tokenizer, "tokenizer", tokenizer)
    tok.padding_side = "left"
    texts = [render(tokenizer, p, chat, system) for p in prompts]
    special = texts == list(prompts)  # a chat template already holds its special tokens
    batches = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
    encoded = [_encode(tok, recipe, batch, special) for batch in batches]
    patch = attnedit.patch(model, recipe, backend=backend)  # compiled once, applied for the patched run
    runs: dict[str, list[str]] = {}
    with Progress(console=err_console, transient=True) as bar:
        for label in ("unpatched", "patched"):
            task = bar.add_task(f"generating ({label})", total=len(batches))
            runs[label] = []
            if label == "patched":
                patch.apply()
            try:
                for enc, spans in encoded:
                    enc = {k: v.to(model.device) for k, v in enc.items()}
                    patch.set_spans(spans)
                    with torch.no_grad():
                        out = model.generate(
                            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
                        )
                    runs[label] += tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                    bar.advance(task)
            finally:
                patch.remove()
    from attnedit.kernels import choose  # noqa: PLC0415

    used = choose(patch.backend, model.device)
    rows = [
        {"prompt": p, "unpatched": a.strip(), "patched": b.strip()}
        for p, a, b in zip(prompts, runs["unpatched"], runs["patched"])
    ]
    return {"backend": used, "max_new_tokens": max_new_tokens, "generations": rows}


def _encode(tok, recipe, texts, special: bool):
    """Tokenize a batch; with a span-highlighting method, strip the markers and return the spans."""
    spans = None
    encode = next((m.spans for m in map(_method, recipe.interventions) if m.spans is not None), None)
    if encode is not None:
        enc, spans = encode(tok, texts, recipe, add_special_tokens=special)
    else:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=special)
    return dict(enc), spans


def _method(spec):
    from attnedit.interventions import registry  # noqa: PLC0415

    return registry.get(spec.type)
