"""Small offline material for the eval tests: a word-level tokenizer, a tiny model over it, toy task files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import models

POSITIVE = "good great fine lovely superb".split()
NEGATIVE = "bad awful poor dull weak".split()
FILLER = "the film was a story with an actor and some music in it plot".split()
CHAT = (
    "{% for m in messages %}<| {{ m['role'] }} |> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<| assistant |> {% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<|", "|>", "<|end|>", "user", "assistant", "system"]


def word_tokenizer(texts, chat: bool = False):
    """A fast word-level tokenizer over the words of `texts` (and the special tokens)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = list(SPECIALS)
    for t in texts:
        for w in re.findall(r"\w+|[^\w\s]+", t):
            if w not in words:
                words.append(w)
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.add_special_tokens(["<pad>", "<s>", "</s>", "<image>", "<|end|>"])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if chat:
        tok.chat_template = CHAT
    return tok


def toy_rows(n: int, seed: int) -> list[dict]:
    """Sentences of varied length whose sentiment word decides the label."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        word = rng.choice(POSITIVE if label else NEGATIVE)
        words = rng.sample(FILLER, rng.randint(1, 9)) + [word] + rng.sample(FILLER, rng.randint(0, 5))
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


TOY_SPEC = """\
name: toy
kind: classification
labels: {neg: bad, pos: good}
template: "review : {text} sentiment :"
chat: false
local:
  format: jsonl
  train: train.jsonl
  test: test.jsonl
  fields: {text: sentence}
  label: label
  label_map: {"0": neg, "1": pos}
"""


def toy_task(folder: Path, n_train: int = 24, n_test: int = 20, spec: str = TOY_SPEC) -> Path:
    """Write the toy classification task (spec + JSONL files) into `folder`; return the spec path."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(n, seed)))
    path = folder / "toy.yaml"
    path.write_text(spec)
    return path


def vocabulary_texts() -> list[str]:
    from attnedit.evals.facts import FACTS

    texts = [" ".join(POSITIVE + NEGATIVE + FILLER), "review : sentiment : . , ? ! ' -"]
    for template, table in FACTS.values():
        texts.append(template)
        texts += [f"{s} {o}" for s, o in table.items()]
    return texts


def tiny_lm(chat: bool = False, seed: int = 0):
    """(tiny random Llama, word tokenizer) that cover the toy task and the fact table."""
    tok = word_tokenizer(vocabulary_texts(), chat=chat)
    model = models.tiny("llama", seed=seed, vocab_size=len(tok))
    return model, tok


def save_tiny(folder: Path, chat: bool = False) -> Path:
    """A tiny model folder that `attnedit.load` (and so `--model`) can read."""
    model, tok = tiny_lm(chat=chat)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
