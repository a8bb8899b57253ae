"""Helpers of the export tests: a tiny tokenizer, VLM inputs, comparisons."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

import attnedit

exp = importlib.import_module("attnedit.export")  # the module (attnedit.export is the function)


def tiny_tokenizer():
    """A 255-word tokenizer for the tiny text models: <pad> <s> </s> <unk>, words w4 .. w254."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tkm
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 255)}}
    inner = Tokenizer(tkm.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=inner, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    return tok


def vlm_inputs(processor, name: str = "llava"):
    """Two left-padded prompts, one image each (tests/vlm.py builds the tiny VLMs and their processors)."""
    import vlm

    return vlm.inputs(processor, ["<image>\nWhat is here?", "<image>\nA longer question about it?"], name)


def rel(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return ((a - b).norm() / b.norm()).item()


def recipe(text: str) -> attnedit.Recipe:
    return attnedit.Recipe.from_str(text, "test.yaml")


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` (relative name -> bytes): to check a folder is exactly as it was."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
