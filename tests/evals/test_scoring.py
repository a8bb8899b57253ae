"""Scoring: prompts, seeded demonstrations, batching that does not change scores, choice log-likelihoods."""

from __future__ import annotations

import pytest
import torch

import attnedit
from attnedit.evals import TaskError, demonstrations, encode, load_task, metric, score
from attnedit.evals.prompts import Encoded
from attnedit.evals.scoring import _cache_arg, choice_scores, plan_batches

RECIPES = {
    "act": "interventions: [{type: act, layers: '1:', beta: 0.3, tau: 0.05}]",
    "zerotuning": "interventions: [{type: zerotuning, gamma: 3.0}]",
}


def test_scores_match_a_hand_written_loop(tiny, toy):
    model, tok = tiny
    task = load_task(str(toy))
    examples = task.split("test")
    recs = score(model, tok, task, examples, batch_size=4, progress=False)
    words = [tok(" " + w, add_special_tokens=False).input_ids[0] for w in task.spec.labels.values()]
    correct = 0
    for ex, rec in zip(examples, recs):
        ids = tok("review : " + ex.fields["text"] + " sentiment :", return_tensors="pt").input_ids
        with torch.no_grad():
            logp = model(ids).logits[0, -1].log_softmax(-1)
        expect = [logp[w].item() for w in words]
        assert rec["scores"] == pytest.approx(expect, abs=1e-5)
        pred = int(expect[1] > expect[0])
        assert rec["pred"] == pred
        correct += pred == ex.gold[0]
    assert metric(recs, task)["accuracy"] == correct / len(examples)


@pytest.mark.parametrize("recipe", [None, "act", "zerotuning"])
def test_batching_with_left_padding_gives_batch_size_one_scores(tiny, toy, recipe):
    model, tok = tiny
    task = load_task(str(toy))
    examples = task.split("test")
    rec = attnedit.Recipe.from_str(RECIPES[recipe]) if recipe else None
    enc = encode(task, examples, tok, shots=2, seed=3)
    assert len({len(e.prompt_ids) for e in enc}) > 5  # rows of many lengths: real padding
    one = score(model, tok, task, examples, encoded=enc, batch_size=1, recipe=rec, progress=False)
    many = score(model, tok, task, examples, encoded=enc, batch_size=7, recipe=rec, progress=False)
    for a, b in zip(one, many):
        assert a["scores"] == pytest.approx(b["scores"], abs=2e-5)
        assert a["pred"] == b["pred"]


def test_recipe_changes_scores(tiny, toy):
    model, tok = tiny
    task = load_task(str(toy))
    examples = task.split("test")[:6]
    base = score(model, tok, task, examples, progress=False)
    edit = score(model, tok, task, examples, recipe=attnedit.Recipe.from_str(RECIPES["zerotuning"]), progress=False)
    assert max(abs(a - b) for x, y in zip(base, edit) for a, b in zip(x["scores"], y["scores"])) > 1e-3
    again = score(model, tok, task, examples, progress=False)
    assert [r["scores"] for r in again] == [r["scores"] for r in base]  # the patch came off


def test_continuation_path_agrees_with_last_position(tiny, toy, tmp_path):
    """Two-token answers go through prompt+choice forwards; with a one-token first part they must agree."""
    model, tok = tiny
    task = load_task(str(toy))
    examples = task.split("test")[:8]
    single = score(model, tok, task, examples, progress=False)
    two = load_task(str(toy), labels={"neg": "bad film", "pos": "good film"})
    double = score(model, tok, two, two.split("test")[:8], batch_size=3, progress=False)
    film = tok(" film", add_special_tokens=False).input_ids[0]
    for ex, s, d in zip(examples, single, double):
        for j, word in enumerate(("bad", "good")):
            ids = tok("review : " + ex.fields["text"] + " sentiment : " + word, return_tensors="pt").input_ids
            with torch.no_grad():
                second = model(ids).logits[0, -1].log_softmax(-1)[film].item()
            assert d["scores"][j] == pytest.approx(s["scores"][j] + second, abs=1e-4)


def test_length_normalisation(tiny, toy):
    model, tok = tiny
    task = load_task(str(toy), labels={"neg": "bad film", "pos": "good"}, normalize="tokens")
    raw = load_task(str(toy), labels={"neg": "bad film", "pos": "good"})
    a = score(model, tok, task, task.split("test")[:4], progress=False)
    b = score(model, tok, raw, raw.split("test")[:4], progress=False)
    for x, y in zip(a, b):
        assert x["scores"] == pytest.approx([y["scores"][0] / 2, y["scores"][1]])


def test_demonstrations_are_seeded_per_example(toy):
    task = load_task(str(toy))
    train, test = task.split("train"), task.split("test")
    a = [demonstrations(ex, train, 3, seed=0) for ex in test]
    assert a == [demonstrations(ex, train, 3, seed=0) for ex in test]
    assert a != [demonstrations(ex, train, 3, seed=1) for ex in test]
    # an example's demonstrations do not depend on which other examples are scored
    assert demonstrations(test[5], train, 3, seed=0) == a[5]
    with pytest.raises(TaskError, match="--shots 30 is larger than the train split \\(24 examples\\)"):
        demonstrations(test[0], train, 30, seed=0)


def test_plain_and_chat_prompts(toy):
    import evalkit

    tok = evalkit.word_tokenizer(evalkit.vocabulary_texts(), chat=True)
    task = load_task(str(toy), chat=None, instruction="rate it")
    ex = task.split("test")[0]
    demo = demonstrations(ex, task.split("train"), 1, seed=0)[0]
    plain = encode(task, [ex], tok, shots=1, chat=False)[0]
    assert (
        plain.prompt
        == f"rate it\n\nreview : {demo.fields['text']} sentiment : {demo.choices[demo.gold[0]]}\n\nreview : "
        f"{ex.fields['text']} sentiment :"
    )
    assert plain.choice_ids == [
        tok(" bad", add_special_tokens=False).input_ids,
        tok(" good", add_special_tokens=False).input_ids,
    ]
    chat = encode(task, [ex], tok, shots=1)[0]  # chat: None -> the tokenizer has a template
    answer = demo.choices[demo.gold[0]]
    assert chat.prompt == (
        f"<| user |> rate it\n\nreview : {demo.fields['text']} sentiment : <|end|> <| assistant |> {answer} <|end|> "
        f"<| user |> review : {ex.fields['text']} sentiment : <|end|> <| assistant |> "
    )
    inline = encode(load_task(str(toy), fewshot="inline", instruction="rate it"), [ex], tok, shots=1, chat=True)[0]
    assert inline.prompt.count("<| user |>") == 1 and f"sentiment : {answer}\n\nreview" in inline.prompt


def test_batches_are_fixed_longest_first(tiny, toy):
    _, tok = tiny
    task = load_task(str(toy))
    enc = encode(task, task.split("test"), tok)
    batches = plan_batches(enc, 4)
    lengths = [enc[i].length for b in batches for i in b]
    assert lengths == sorted(lengths, reverse=True)
    assert sorted(i for b in batches for i in b) == list(range(len(enc)))


def test_knowledge_conflict_metrics(tiny):
    model, tok = tiny
    task = load_task("facts-conflict")
    recs = score(model, tok, task, task.split("test")[:10], progress=False)
    m = metric(recs, task)
    assert m["context_rate"] + m["memory_rate"] == pytest.approx(1.0)
    assert m["value"] == m["context_rate"] == m["accuracy"]
    recall = load_task("facts-recall")
    m2 = metric(score(model, tok, recall, recall.split("test")[:10], progress=False), recall)
    assert m2["value"] == m2["memory_rate"] == m2["accuracy"]


def test_generation_task(tiny, tmp_path):
    model, tok = tiny
    rows = [{"q": "the capital of France is", "a": "Paris"}, {"q": "the capital of Italy is", "a": "Rome"}]
    import json

    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "gen.yaml").write_text(
        "name: gen\nkind: generation\nmetric: contains\ntemplate: '{question}'\nchat: "
        "false\nmax_new_tokens: 4\nstop: ['.']\n"
        "local: {format: jsonl, train: train.jsonl, test: test.jsonl, fields: {question: q}, label: a}\n"
    )
    task = load_task(str(tmp_path / "gen.yaml"))
    recs = score(model, tok, task, task.split("test"), batch_size=2, progress=False)
    assert [r["targets"] for r in recs] == [["Paris"], ["Rome"]]
    for r in recs:
        assert isinstance(r["prediction"], str) and r["correct"] == (
            "paris" in r["prediction"].lower() if r["id"].endswith(":1") else "rome" in r["prediction"].lower()
        )
    assert metric(recs, task)["contains"] == sum(r["correct"] for r in recs) / 2


def test_mixed_answer_lengths_do_not_depend_on_the_batch(tiny, tmp_path):
    """Some examples have one-token choices, some longer ones: each is scored by its own path, in any batch."""
    import json

    import evalkit

    model, tok = tiny
    rows = []
    for i, r in enumerate(evalkit.toy_rows(12, 5)):
        choices = ["bad", "good"] if i % 3 else ["bad film", "good film", "fine"]
        rows.append({"q": r["sentence"], "choices": choices, "gold": r["label"]})
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mc.yaml").write_text(
        "name: mc\nkind: multiple_choice\ntemplate: 'review : {q} sentiment :'\nchat: false\n"
        "local: {format: jsonl, train: train.jsonl, test: test.jsonl, fields: {q: q}}\n"
    )
    task = load_task(str(tmp_path / "mc.yaml"))
    examples = task.split("test")
    rec = attnedit.Recipe.from_str(RECIPES["act"])
    one = score(model, tok, task, examples, batch_size=1, recipe=rec, progress=False)
    many = score(model, tok, task, examples, batch_size=5, recipe=rec, progress=False)
    for a, b in zip(one, many):
        assert a["scores"] == pytest.approx(b["scores"], abs=2e-5)


CACHED = {
    "none": None,
    "zerotuning": "interventions: [{type: zerotuning, gamma: 3.0, layers: [0, 1]}]",
    "head_prune": "interventions: [{type: head_prune, heads: {0: [1], 1: [0, 3]}}]",
    "act": "interventions: [{type: act, layers: '1:', beta: 0.3, tau: 0.05}]",
}


@pytest.mark.parametrize("recipe", list(CACHED))
def test_cached_multi_token_scores_equal_prompt_plus_choice_forwards(tiny, recipe):
    """Choices of 1 to 4 tokens and 2 to 5 choices per prompt, scored over the prompt's cache."""
    model, tok = tiny
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size

    def ids(n):
        return torch.randint(3, V, (n,), generator=g).tolist()

    items = []
    for i in range(9):
        n_choices = 2 + i % 4
        choices = [ids(1 + (i + j) % 4) for j in range(n_choices)]
        items.append(Encoded(i, f"p{i}", ids(5 + 3 * i % 11), choices))
    rec = attnedit.Recipe.from_str(CACHED[recipe]) if CACHED[recipe] else None
    pad = tok.pad_token_id
    with attnedit.patch(model, rec) if rec else torch.no_grad():
        cached, n1 = choice_scores(model, items, pad, chunk=4, cached=True)
        full, n2 = choice_scores(model, items, pad, chunk=4, cached=False)
        auto, _ = choice_scores(model, items, pad, chunk=4)
    assert n1 == n2 == [[len(c) for c in it.choice_ids] for it in items]
    assert auto == cached  # the cache is the default where the patch does not read the input ids
    if recipe != "act":
        for a, b in zip(cached, full):
            assert a == pytest.approx(b, abs=1e-4)
        return
    # ACT detects sinks at the prompt; the answer is scored as generated: prompt, then one token at a time
    for it, got in zip(items, cached):
        for c, value in zip(it.choice_ids, got):
            with attnedit.patch(model, rec), torch.no_grad():
                out = model(input_ids=torch.tensor([it.prompt_ids]), use_cache=True)
                cache, total = _cache_of(out), out.logits[0, -1].log_softmax(-1)[c[0]].item()
                for prev, nxt in zip(c, c[1:]):
                    out = model(input_ids=torch.tensor([[prev]]), use_cache=True, **{_cache_arg(model): cache})
                    cache, total = _cache_of(out), total + out.logits[0, -1].log_softmax(-1)[nxt].item()
            assert value == pytest.approx(total, abs=1e-4)
    assert max(abs(a - b) for x, y in zip(cached, full) for a, b in zip(x, y)) > 1e-3  # detection differs


def _cache_of(out):
    return getattr(out, "cache", None) or out.past_key_values
