"""The runtime without a model: state buffers, one forward's tables, per-device views of a split model."""

from __future__ import annotations

import models
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import attnedit
from attnedit import runtime as R
from attnedit import tables as T
from attnedit.kernels import dispatch


class _Sinks:
    """An attention detector stand-in: the tests hand its result to `layer_tables` directly."""

    flag = T.ACTSINK
    where = "attention"


def plan(flags=(T.FIRST, T.SPAN, T.HSINK, T.ACTSINK), H: int = 2) -> T.LayerPlan:
    G = 1 << len(flags)
    bias = torch.arange(H * G, dtype=torch.float32).view(H, G)
    return T.LayerPlan(0, H, tuple(flags), bias, (), None, None, detectors=(_Sinks(),))


def forward(state, B=2, length=5, past=0, capacity=None, detect=None, mask=None, spans=None):
    compiled = T.CompiledRecipe({}, needs_spans=spans is not None)
    return R.begin(
        state,
        compiled,
        batch=B,
        length=length,
        device=torch.device("cpu"),
        past=past,
        capacity=capacity or (past + length if isinstance(past, int) else 16),
        detect=(past == 0) if detect is None else detect,
        attention_mask=mask,
        input_ids=None,
        spans=spans,
    )


def test_key_groups_from_first_token_spans_and_sinks():
    state = R.State()
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    spans = torch.tensor([[[1, 3]], [[3, 4]]])
    fwd = forward(state, mask=mask, spans=spans)
    R.record_layer_detection(fwd, 0, torch.tensor([[0, 0, 0, 1, 0], [0, 0, 0, 0, 1]], dtype=torch.bool))
    sinks = torch.zeros(2, 2, 5, dtype=torch.bool)
    sinks[1, 0, 3] = True
    tables = R.layer_tables(
        plan(), fwd, 0, device=torch.device("cpu"), heads=2, k_len=5, kv_offset=0, detect_sinks=lambda pre: sinks
    )
    g = tables.key_group
    # bits: FIRST=1, SPAN=2, HSINK=4, ACTSINK=8 (the plan's flag order)
    assert g[0, 0].tolist() == [1, 2, 2, 4, 0]
    assert g[1, 0].tolist() == [0, 0, 1, 10, 4]
    assert g[1, 1].tolist() == [0, 0, 1, 2, 4]
    assert tables.first_key.tolist() == [0, 2]


def test_decoding_steps_write_in_place_and_keep_prefill_detections():
    state = R.State()
    fwd = forward(state, length=5, capacity=5)
    R.record_layer_detection(fwd, 0, torch.tensor([[0, 1, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool))
    sinks = torch.zeros(2, 2, 5, dtype=torch.bool)
    sinks[0, 1, 2] = True
    R.layer_tables(
        plan(), fwd, 0, device=torch.device("cpu"), heads=2, k_len=5, kv_offset=0, detect_sinks=lambda pre: sinks
    )
    buffers = [state.flags, state.first, state.hsink[0], state.groups[0]]
    ptrs = [b.data_ptr() for b in buffers]
    allocated = state.allocations
    for step in range(3):  # decoding: one token at a time, positions 5, 6, 7
        fwd = forward(state, length=1, past=5 + step, capacity=6 + step)
        R.record_layer_detection(fwd, 0, torch.ones(2, 1, dtype=torch.bool))  # written at the new position
        tables = R.layer_tables(plan(), fwd, 0, device=torch.device("cpu"), heads=2, k_len=6 + step, kv_offset=0)
    assert state.allocations == allocated, "a decoding step within capacity allocates nothing"
    assert [b.data_ptr() for b in [state.flags, state.first, state.hsink[0], state.groups[0]]] == ptrs
    g = tables.key_group
    # the prefill's first token, hidden sinks and attention sink (head 1 of row 0), then the steps' hidden flags;
    # decoding steps never add attention sinks
    assert g[0, 1].tolist() == [1, 4, 8, 0, 0, 4, 4, 4]
    assert g[0, 0].tolist() == [1, 4, 0, 0, 0, 4, 4, 4]
    assert g[1, 0].tolist() == [1, 0, 0, 0, 4, 4, 4, 4]


def test_decoding_reads_the_same_groups_as_a_rebuild_and_a_new_input_replaces_them():
    """Decoding steps read the layer's kept group ids: equal to rebuilding every key's flags, also for a
    second input with other spans, sinks and padding in the same buffers, and a first token that moves."""
    state = R.State()
    gen = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")

    def rebuilt(fwd, k_len, sinks):
        flags = R.key_flags(plan(), fwd, fwd.on(cpu), 0, 2, k_len, 0)
        sinks = torch.nn.functional.pad(sinks, (0, k_len - sinks.shape[-1])).to(torch.uint8)
        return R.group_ids(plan(), flags | sinks * T.ACTSINK)

    inputs = [  # (prompt length, padding mask, spans, decoding steps)
        (6, torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]]), torch.tensor([[[1, 3]], [[4, 6]]]), 4),
        (4, torch.tensor([[0, 1, 1, 1], [1] * 4]), torch.tensor([[[0, 1]], [[2, 3]]]), 3),
    ]
    checked = 0
    for n, pad, spans, steps in inputs:
        sinks = torch.rand(2, 2, n, generator=gen) < 0.4
        fwd = forward(state, length=n, capacity=16, mask=pad, spans=spans)
        R.record_layer_detection(fwd, 0, torch.rand(2, n, generator=gen) < 0.3)
        t = R.layer_tables(plan(), fwd, 0, device=cpu, heads=2, k_len=n, kv_offset=0, detect_sinks=lambda pre: sinks)
        assert torch.equal(t.key_group, rebuilt(fwd, n, sinks))
        for step in range(steps):
            pad = torch.cat([pad, torch.ones(2, 1, dtype=pad.dtype)], 1)
            if step == 2:  # the padding mask now starts row 1 one token later: its first real token moves
                pad[1, : int(pad[1].argmax()) + 1] = 0
            fwd = forward(state, length=1, past=n + step, capacity=16, mask=pad, spans=spans)
            R.record_layer_detection(fwd, 0, torch.rand(2, 1, generator=gen) < 0.5)
            t = R.layer_tables(plan(), fwd, 0, device=cpu, heads=2, k_len=n + step + 1, kv_offset=0)
            assert torch.equal(t.key_group, rebuilt(fwd, n + step + 1, sinks)), (n, step)
            checked += 1
    assert checked == 7 and state.groups[0].shape == (2, 2, state.capacity)


def test_new_prefill_overwrites_stale_positions_without_reallocating():
    state = R.State()
    fwd = forward(state, length=5, capacity=8)
    R.layer_tables(
        plan(),
        fwd,
        0,
        device=torch.device("cpu"),
        heads=2,
        k_len=5,
        kv_offset=0,
        detect_sinks=lambda pre: torch.ones(2, 2, 5, dtype=torch.bool),
    )
    allocated = state.allocations
    fwd = forward(state, length=4, capacity=8)
    t = R.layer_tables(
        plan(),
        fwd,
        0,
        device=torch.device("cpu"),
        heads=2,
        k_len=4,
        kv_offset=0,
        detect_sinks=lambda pre: torch.zeros(2, 2, 4, dtype=torch.bool),
    )
    assert state.allocations == allocated
    assert (t.key_group & 8).sum() == 0, "the old input's sinks are gone"


def test_dynamic_cache_growth_keeps_contents():
    state = R.State()
    fwd = forward(state, length=R.ALIGN - 1, capacity=R.ALIGN - 1)
    found = torch.zeros(2, R.ALIGN - 1, dtype=torch.bool)
    found[:, 7] = True
    R.record_layer_detection(fwd, 0, found)
    cap = state.capacity
    fwd = forward(state, length=2, past=R.ALIGN - 1)  # outgrows the buffers
    R.record_layer_detection(fwd, 0, torch.zeros(2, 2, dtype=torch.bool))
    assert state.capacity > cap
    assert state.hsink[0][:, 7].tolist() == [1, 1] and state.hsink[0].shape[1] == state.capacity


def test_static_cache_position_is_read_from_the_device():
    state = R.State()
    forward(state, length=5, capacity=16)
    past = torch.tensor(5)
    fwd = forward(state, length=1, past=past, capacity=16, detect=False)
    past.add_(1)  # the cache advances its own counter during the forward: the forward keeps its copy
    assert fwd.past is None and int(fwd.home.pos0) == 5 and fwd.home.positions.tolist() == [5]
    assert fwd.kv_offset(1, 16) == 0


def test_static_cache_steps_write_kept_buffers_and_prompts_do_not_pile_up():
    """On a static cache a step's position and positions are the same tensors at every step, written in
    place (a compiled step reads them at fixed addresses); a new prompt drops the previous prompt's."""
    state = R.State()
    spans = torch.tensor([[[1, 3]], [[2, 4]]])
    forward(state, length=11, past=torch.tensor(0), capacity=32, detect=True, spans=spans)
    homes = []
    for step in range(3):
        fwd = forward(state, length=1, past=torch.tensor(11 + step), capacity=32, detect=False, spans=spans)
        homes.append((fwd.home, fwd.home.positions.data_ptr(), fwd.home.new.data_ptr(), fwd.home.pos0.data_ptr()))
        assert fwd.home.positions.tolist() == [11 + step] and int(fwd.home.pos0) == 11 + step
    assert len({(id(h), p, n, z) for h, p, n, z in homes}) == 1
    forward(state, length=13, past=torch.tensor(0), capacity=32, detect=True, spans=spans)
    lengths = {k[2] if k[0] == "view" else (k[1][-1] if k[1] else 1) for k in state.steps}
    assert lengths == {1, 13}


class _Meta(torch.nn.Module):
    """A stand-in for a layer placed on another device."""


def test_split_model_moves_per_input_state_once_per_forward_and_device(monkeypatch):
    """Layers on a second device (here 'meta') get tables on that device; per-input state crosses once."""
    model = models.tiny("llama")  # 4 layers
    ids, mask = models.batch()
    recipe = attnedit.Recipe.from_str(
        "interventions: [{type: zerotuning, gamma: 3.0}, {type: pasta, alpha: 0.1, heads: {1: all, 3: [0]}}]", "t.yaml"
    )
    seen = {}

    def fake_attention(name, q, k, v, tables, mask, **kw):
        seen[id(q)] = tables
        return torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3], device=q.device)

    monkeypatch.setattr(dispatch, "attention", fake_attention)
    moves = []
    real_to = torch.Tensor.to

    def counting_to(self, *args, **kwargs):
        out = real_to(self, *args, **kwargs)
        if out.device.type == "meta" and self.device.type == "cpu":
            moves.append(tuple(self.shape))
        return out

    layers = attnedit.modelinfo.decoder_layers(model)
    with torch.no_grad(), attnedit.patch(model, recipe, backend="reference", spans=[[(1, 4)], [(5, 8)], [(8, 9)]]) as p:
        B, T_ = ids.shape
        q = torch.randn(B, 8, T_, 16, device="meta")
        k = torch.randn(B, 2, T_, 16, device="meta")
        counts = []
        for n_meta in (2, 4):
            model(ids, attention_mask=mask)  # a real forward on the CPU: this forward's shared state
            monkeypatch.setattr(torch.Tensor, "to", counting_to)
            moves.clear()
            for layer in layers[:n_meta]:
                dense = torch.ones(B, 1, T_, T_, dtype=torch.bool, device="meta")
                p._attention(layer.self_attn, q, k, k, dense)
            monkeypatch.setattr(torch.Tensor, "to", real_to)
            counts.append([m for m in moves if m[0] == B or m == (T_,)])  # per-input tensors (plans move once ever)
            for layer in layers[:n_meta]:
                t = seen[id(q)]
                assert t.key_group.device.type == "meta" and t.first_key.device.type == "meta"
        assert p._fwd.moves_to == ["meta"]
    assert counts[0] and counts[0] == counts[1], "per-input state crosses once per forward, not once per layer"


def test_first_real_tokens_are_found_once_per_input():
    """A decoding step keeps the prefill's first real tokens; a new input and a chunk of several tokens renew them."""
    state = R.State()
    pad = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    forward(state, mask=pad)
    assert state.first.tolist() == [2, 0]
    step = torch.cat([pad, torch.ones(2, 1, dtype=pad.dtype)], 1)
    step[0, :2] = 1  # a mask that is no extension of the prefill's: a decoding step does not read it
    forward(state, length=1, past=5, mask=step)
    assert state.first.tolist() == [2, 0]
    # a new input with other padding (same batch size: same buffers) renews them
    other = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]])
    forward(state, length=6, mask=other)
    assert state.first.tolist() == [0, 3]
    # a chunked prefill's later chunk (several tokens) reads its mask
    chunk = torch.cat([torch.tensor([[0, 0, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1]]), torch.ones(2, 2, dtype=pad.dtype)], 1)
    forward(state, length=2, past=6, mask=chunk)
    assert state.first.tolist() == [6, 3]
    # state that never saw this input's prefill (a patch applied after it) reads a decoding step's mask once
    late = R.State()
    forward(late, length=1, past=5, mask=torch.cat([pad, torch.ones(2, 1, dtype=pad.dtype)], 1))
    assert late.first.tolist() == [2, 0] and late.first_known
    forward(late, length=1, past=6, mask=torch.ones(2, 7, dtype=pad.dtype))
    assert late.first.tolist() == [2, 0]


def test_a_prefill_clears_hidden_state_sinks_a_longer_input_left_behind():
    """Sinks found at prefill only: a decoding step writes nothing, so the prefill clears the later positions."""
    state = R.State()
    fwd = forward(state, length=8, capacity=16)
    found = torch.zeros(2, 8, dtype=torch.bool)
    found[:, 6] = True
    R.record_layer_detection(fwd, 0, found)
    fwd = forward(state, length=4, capacity=16)  # a shorter input, same buffers
    R.record_layer_detection(fwd, 0, torch.zeros(2, 4, dtype=torch.bool))
    assert state.hsink[0].sum() == 0
    # its decoding steps (no detection written) see position 6 unflagged
    for past in (4, 5, 6):
        fwd = forward(state, length=1, past=past, capacity=16)
        t = R.layer_tables(
            plan((T.FIRST, T.HSINK)), fwd, 0, device=torch.device("cpu"), heads=2, k_len=past + 1, kv_offset=0
        )
        assert (t.key_group & 2).sum() == 0


class _HiddenSinks:
    """A layer-input detector stand-in (VAR's kind): `prefill_only` says whether it runs after the prefill."""

    flag = T.HSINK
    where = "layer_input"

    def __init__(self, prefill_only: bool):
        self.prefill_only = prefill_only


def test_decoding_step_shares_new_groups_only_when_hidden_sinks_are_found_at_prefill_alone():
    """A decoding step's new positions: with prefill-only hidden-state detectors their groups come from
    per-input flags alone, computed once per forward for all layers; with a detector that also runs at
    the step, each layer reads what it flagged there."""
    cpu = torch.device("cpu")
    for prefill_only in (True, False):
        layer_plans = [
            T.LayerPlan(
                i, 2, (T.SPAN, T.HSINK), torch.zeros(2, 4), (), None, None, detectors=(_HiddenSinks(prefill_only),)
            )
            for i in range(2)
        ]
        state = R.State()
        spans = torch.tensor([[[1, 2], [5, 6]], [[0, 1], [9, 9]]])  # row 0's second span holds the step's token
        fwd = forward(state, length=5, capacity=8, spans=spans)
        for i, p in enumerate(layer_plans):
            R.record_layer_detection(fwd, i, torch.zeros(2, 5, dtype=torch.bool))
            R.layer_tables(p, fwd, i, device=cpu, heads=2, k_len=5, kv_offset=0)
        fwd = forward(state, length=1, past=5, capacity=8, spans=spans)
        if not prefill_only:  # the step's detector flags the new token of layer 1, row 1
            for i in range(2):
                R.record_layer_detection(fwd, i, torch.tensor([[False], [i == 1]]))
        groups = [
            R.layer_tables(p, fwd, i, device=cpu, heads=2, k_len=6, kv_offset=0).key_group
            for i, p in enumerate(layer_plans)
        ]
        # bits: SPAN=1, HSINK=2
        assert groups[0][:, 0, 5].tolist() == [1, 0]
        assert groups[1][:, 0, 5].tolist() == ([1, 0] if prefill_only else [1, 2])
        shared = [k for k in fwd.cache if k[0] == "new_groups"]
        assert len(shared) == (1 if prefill_only else 0)


def test_decoding_steps_of_attention_sinks_alone_write_nothing_and_read_no_stale_group():
    """ACT's layers (attention sinks, no per-input flags): a decoding step's tokens are in group 0, which the
    prefill leaves at every later position, so a step writes nothing, also after a longer input whose sinks
    sat at those positions."""
    state = R.State()
    cpu = torch.device("cpu")
    act = plan(flags=(T.ACTSINK,))
    fwd = forward(state, length=8, capacity=16)
    R.layer_tables(act, fwd, 0, device=cpu, heads=2, k_len=8, kv_offset=0, detect_sinks=lambda pre: torch.ones(2, 2, 8))
    fwd = forward(state, length=4, capacity=16)  # a shorter input in the same buffers, without sinks
    R.layer_tables(
        act, fwd, 0, device=cpu, heads=2, k_len=4, kv_offset=0, detect_sinks=lambda pre: torch.zeros(2, 2, 4)
    )
    for step in range(3):
        fwd = forward(state, length=1, past=4 + step, capacity=16)
        with _Writes() as writes:
            t = R.layer_tables(act, fwd, 0, device=cpu, heads=2, k_len=5 + step, kv_offset=0)
        assert t.key_group.shape == (2, 2, 5 + step)
        assert int(t.key_group.sum()) == 0, f"step {step}: a sink of the longer input is read back"
        assert not writes.ops, f"step {step} wrote into the buffers: {writes.ops}"


class _Writes(TorchDispatchMode):
    """The in-place aten operations dispatched inside the block."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name.endswith("_") or "copy" in func._schema.name:
            self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


class _ImageTokens:
    """An input detector stand-in: token id 9 is an image token."""

    flag = T.IMAGE

    def detect(self, ids):
        return ids == 9


def test_group_ids_table_equals_packing_bit_by_bit():
    """The plan's lookup table of every flag byte gives the ids the bit-by-bit packing gives."""
    for flags in ((T.FIRST,), (T.SPAN, T.HSINK), (T.FIRST, T.SPAN, T.IMAGE, T.HSINK, T.ACTSINK), (T.ACTSINK, T.IMAGE)):
        p = plan(flags)
        every = torch.arange(256, dtype=torch.uint8).view(2, 4, 32)
        by_bits = torch.zeros_like(every)
        for k, bit in enumerate(flags):
            by_bits |= ((every & bit) != 0).to(torch.uint8) << k
        assert torch.equal(R.group_ids(p, every), by_bits), flags


def test_image_end_is_kept_per_input_and_moves_only_with_an_image_token():
    """A prefill finds each row's end of image tokens; a decoding step raises it only where its own token is one."""
    state = R.State()
    compiled = T.CompiledRecipe({}, input_detectors=(_ImageTokens(),))

    def run(ids, past):
        return R.begin(
            state, compiled, batch=2, length=ids.shape[1], device=torch.device("cpu"), past=past, capacity=16,
            detect=past == 0, attention_mask=None, input_ids=ids, spans=None,
        )  # fmt: skip

    fwd = run(torch.tensor([[1, 9, 9, 2, 3], [1, 2, 3, 4, 5]]), 0)
    buffer = state.image_end
    assert fwd.home.image_end is buffer and buffer.tolist() == [3, 0]
    run(torch.tensor([[4], [5]]), 5)
    assert buffer.tolist() == [3, 0]
    run(torch.tensor([[4], [9]]), 6)  # row 1 generates an image token at position 6
    assert buffer.tolist() == [3, 7] and state.image_end is buffer
    run(torch.tensor([[1, 2, 9, 3], [1, 2, 3, 4]]), 0)  # a new input: found anew, nothing of the old one
    assert buffer.tolist() == [3, 0]


def test_a_decoding_step_writes_the_new_groups_of_every_layer_of_equal_flags_at_once():
    """Layers whose plans have the same flags keep their group ids in one stacked buffer: a decoding step
    writes its tokens' groups into all of them with one operation, and each layer reads what a rebuild gives."""
    cpu = torch.device("cpu")
    plans = {
        i: T.LayerPlan(i, 2, (T.SPAN, T.HSINK), torch.zeros(2, 4), (), None, None, detectors=(_HiddenSinks(True),))
        for i in range(4)
    }
    compiled = T.CompiledRecipe(plans, needs_spans=True)
    assert compiled.group_members == {((T.SPAN, T.HSINK), False): ((0, 1, 2, 3), {0: 0, 1: 1, 2: 2, 3: 3})}
    state = R.State()
    spans = torch.tensor([[[1, 2], [6, 7]], [[0, 1], [9, 9]]])  # row 0's second span holds the second step's token

    def run(length, past):
        return R.begin(
            state, compiled, batch=2, length=length, device=cpu, past=past, capacity=16, detect=past == 0,
            attention_mask=None, input_ids=None, spans=spans,
        )  # fmt: skip

    fwd = run(5, 0)
    for i, p in plans.items():
        found = torch.zeros(2, 5, dtype=torch.bool)
        found[i % 2, i] = True  # a hidden-state sink of its own in every layer
        R.record_layer_detection(fwd, i, found)
        R.layer_tables(p, fwd, i, device=cpu, heads=2, k_len=5, kv_offset=0)
    for step in range(2):
        fwd = run(1, 5 + step)
        with _Writes() as writes:
            groups = [
                R.layer_tables(p, fwd, i, device=cpu, heads=2, k_len=6 + step, kv_offset=0) for i, p in plans.items()
            ]
        assert [op for op in writes.ops if op.endswith("_")] == ["aten::index_copy_"], writes.ops
        for i, t in enumerate(groups):
            flags = R.key_flags(plans[i], fwd, fwd.on(cpu), i, 2, 6 + step, 0)
            assert torch.equal(t.key_group, R.group_ids(plans[i], flags)), (step, i)
    assert groups[0].key_group[:, 0, 5:].tolist() == [[0, 1], [0, 0]]
    assert state.groups[3]._base is state.groups[0]._base, "the layers' buffers are slots of one stack"
