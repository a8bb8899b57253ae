"""The per-forward half of the parameter tables: per-input state in device buffers, tables for one forward.

`attnedit.tables` compiles a recipe into static `LayerPlan`s once per model.
This module turns a plan and the per-input state into the `LayerTables` of one
forward, with the device doing all the work:

- `State` keeps what a prefill found for the decoding steps (input flags such
  as highlighted spans and image tokens, hidden-state sinks per layer,
  per-input head scales, and the key-group ids of layers whose groups differ
  by layer, attention sinks included) in buffers sized like the KV cache,
  (batch, capacity) by absolute position. A forward writes its own positions
  in place; a decoding step reads views. Buffers are allocated at a prefill
  and grown only when a dynamic cache outgrows them, so a captured CUDA graph
  or a compiled step keeps reading the same memory.
- `Forward` is what every layer of one forward shares: the absolute position
  of the first token (a Python int when the cache knows it, else a device
  scalar, as transformers' static cache keeps it), the positions written,
  each row's first real token. It is built once per forward; `Forward.on`
  moves it to another device once per forward and device (a model split
  across devices by accelerate).
- `layer_tables` builds one layer's tables from a plan, a `Forward` and the
  state, on the device of that layer's query, with fixed shapes: no host
  sync, no Python branch on tensor values, no step-dependent allocation.

Nothing here depends on transformers: `attnedit.patch` is the glue that calls it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from attnedit.kernels.device import capturing

from . import tables as T

PER_LAYER = T.PER_LAYER  # flags kept per layer (the others are per input: the same in every layer)
ALIGN = 256  # buffer capacities are multiples of this (a dynamic cache grows them rarely)


def _round_up(n: int, to: int = ALIGN) -> int:
    return max(to, (n + to - 1) // to * to)


def _mark_static(t: torch.Tensor) -> torch.Tensor:
    """Tell torch.compile's CUDA graphs that this buffer keeps its address (it is written in place)."""
    try:
        torch._dynamo.mark_static_address(t)
    except Exception:  # noqa: BLE001 - an old torch without the marker: graphs then copy the buffer
        pass
    return t


class HeadScales(dict):
    """layer -> (B, H) fp32 per-input output scales; setting a layer again writes into the same buffer."""

    def __setitem__(self, layer: int, scale: torch.Tensor) -> None:
        old = self.get(layer)
        scale = scale.detach().float()
        if old is not None and old.shape == scale.shape and old.device == scale.device:
            old.copy_(scale)
            return
        super().__setitem__(layer, _mark_static(scale.clone()))

    def reset(self) -> None:
        """A new input: every scale back to 1 (buffers kept)."""
        for t in self.values():
            t.fill_(1.0)


class State:
    """Per-input state by absolute position, in device buffers of `capacity` positions.

    Attributes:
        batch: rows the buffers hold.
        capacity: positions the buffers hold (>= the KV cache's length).
        flags: (B, C) uint8 input flags (SPAN, IMAGE) on the input's device.
        first: (B,) int64 absolute position of each row's first real token, set at a prefill and at any
            later forward of several tokens with a padding mask (a chunked prefill), and at a one-token
            forward only while `first_known` is False (a patch applied after the prefill): a decoding
            step's padding mask extends the previous one with a 1 (as `generate` makes it), which
            leaves every row's first real token where it was.
        first_known: `first` holds the current input's answer (False until a forward sets it).
        hsink: layer -> (B, C) uint8 hidden-state sinks (0/1), on that layer's device.
        groups: layer -> (B, 1|H, C) uint8 key-group ids of a layer whose plan has per-layer flags (hidden
            or attention sinks), on that layer's device, packed as `group_ids` packs them but without the
            FIRST bit (added when read: the first real token is known anew at every forward). A prefill
            writes every key it attends to (attention sinks found then included); a later forward writes
            only its own positions (never attention sinks), so a decoding step reads a view of it instead
            of rebuilding every key's flags in every layer. Each is a view of one slot of a stack
            (`stacks`) shared by the layers whose plans have the same flags, so that a decoding step
            writes its tokens' groups into all of them with one operation (`group_buffer`).
        stacks: (layers, rows, device) -> (L, B, rows, C) uint8: the `groups` of those layers, stacked.
        members: (plan flags, hidden sinks flagged after the prefill) -> (layers, layer -> slot): the
            layers whose groups share a stack, from the compiled recipe (`know`); a layer outside it
            (a plan not in the recipe) gets a stack of its own.
        image_end: (B,) int64 position after each row's last image token (0: none), kept per input:
            a prefill computes it, a decoding step only raises it where its own token is an image token.
        head_scale: layer -> (B, H) fp32 per-input output scales (set by forward hooks).
        decode_plans: layer -> the attention backend's set-up of that layer's decoding steps
            (`attnedit.kernels.dispatch.decode_step`), kept from an input's first decoding step to the
            next input: cleared by every prefill (`begin` with detect) and whenever the batch size
            changes. The backend rebuilds an entry itself when what it was made from changes.
        steps: (name, shape, device) -> a forward's own tensor (first position, positions, input flags)
            when the cache keeps its length on the device (a static cache): `begin` writes them in place,
            so a compiled or captured step reads them at the same addresses every step. Fresh tensors
            there would be taken for fixed inputs by torch.compile's CUDA graphs (they reach the graph
            through the patch's hooks) and re-recorded at every step.
    """

    def __init__(self) -> None:
        self.batch = 0
        self.capacity = 0
        self.flags: torch.Tensor | None = None
        self.first: torch.Tensor | None = None
        self.first_known = False
        self.hsink: dict[int, torch.Tensor] = {}
        self.groups: dict[int, torch.Tensor] = {}
        self.stacks: dict[tuple, torch.Tensor] = {}
        self.generation = 0  # counts the times stacks were dropped or reallocated (`group_buffer` keeps views)
        self._slots: dict[int, tuple] = {}  # layer -> (generation, rows, device, its view, its stack's key)
        self.members: dict[tuple, tuple[tuple[int, ...], dict[int, int]]] = {}
        self.image_end: torch.Tensor | None = None
        self.row_moves: dict[int, tuple] = {}  # layer -> (row starts, the plan's moves, its moves with them)
        self.head_scale: HeadScales = HeadScales()
        self.decode_plans: dict[int, Any] = {}
        self.steps: dict[tuple, torch.Tensor] = {}
        self.allocations = 0  # buffers (re)allocated: tests check that decoding steps allocate none

    def reserve(self, batch: int, length: int, device: torch.device) -> None:
        """Make the buffers hold `batch` rows and at least `length` positions (grown, contents kept)."""
        if batch != self.batch:
            self.batch, self.capacity = batch, _round_up(length)
            self.flags = self.first = self.image_end = None
            self.hsink.clear()
            self.groups.clear()
            self.stacks.clear()
            self.generation += 1
            self.row_moves.clear()
            self.decode_plans.clear()
            self.steps.clear()
        elif length > self.capacity:
            self.capacity = _round_up(max(length, 2 * self.capacity))
        self.flags = self._fit(self.flags, (batch,), device)
        if self.first is None or self.first.shape != (batch,) or self.first.device != torch.device(device):
            self.first = _mark_static(torch.zeros(batch, dtype=torch.long, device=device))
            self.first_known = False
            self.allocations += 1
        if self.image_end is None or self.image_end.shape != (batch,) or self.image_end.device != torch.device(device):
            self.image_end = _mark_static(torch.zeros(batch, dtype=torch.long, device=device))
            self.allocations += 1

    def know(self, compiled: T.CompiledRecipe) -> None:
        """Group the recipe's layers with per-layer key groups by plan flags (one stack each); a new grouping
        drops the stacks."""
        members = compiled.group_members
        if members is not self.members and members != self.members:
            self.members = members
            self.stacks.clear()
            self.generation += 1
            self.groups.clear()

    def group_buffer(self, plan: T.LayerPlan, layer: int, rows: int, device) -> tuple[torch.Tensor, tuple]:
        """(the layer's (B, rows, C) group buffer, the key of the stack it is a slot of) on `device`.

        Kept per layer while no stack was dropped or reallocated (`generation`) and the capacity holds.
        """
        compiling = torch.compiler.is_compiling()
        hit = None if compiling else self._slots.get(layer)
        if hit is not None and hit[0] == self.generation and hit[1] == rows and hit[2] == device:
            view = hit[3]
            if view.shape[-1] == self.capacity:
                return view, hit[4]
        entry = self.members.get((plan.flags, plan.hsink_after_prefill))
        if entry is not None and layer in entry[1]:
            layers, slot = entry[0], entry[1][layer]
        else:
            layers, slot = (layer,), 0
        key = (layers, rows, device)
        old = self.stacks.get(key)
        if compiling and old is not None and old.shape == (len(layers), self.batch, rows, self.capacity):
            # the slot taken inside the graph: a kept view of the stack would be a second graph input
            # aliasing the stack, which the step writes; torch.compile then merges the two into a
            # "synthetic base" and its CUDA graphs skip the whole step
            return old[slot], key
        stack = self._fit(old, (len(layers), self.batch, rows), device)
        view = self.groups.get(layer)
        if stack is not old:
            self.generation += 1  # the other slots' kept views are of the old stack
        if stack is not old or view is None or view._base is not stack:
            self.stacks[key] = stack
            view = self.groups[layer] = stack[slot]
        self._slots[layer] = (self.generation, rows, device, view, key)
        return view, key

    def _fit(self, buf: torch.Tensor | None, lead: tuple[int, ...], device) -> torch.Tensor:
        """`buf` with shape (*lead, capacity) on `device`: the same tensor when it fits, else a new zeroed one."""
        device = torch.device(device)
        if buf is not None and buf.shape == (*lead, self.capacity) and buf.device == device:
            return buf
        new = torch.zeros(*lead, self.capacity, dtype=torch.uint8, device=device)
        if buf is not None and buf.shape[:-1] == lead:
            n = min(buf.shape[-1], self.capacity)
            new[..., :n] = buf[..., :n].to(device)
        self.allocations += 1
        return _mark_static(new)

    def step_tensor(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device, fill=None) -> torch.Tensor:
        """The persistent buffer `steps[(name, shape, device)]`, made (zeros, or `fill(*shape)`) at its first use."""
        key = (name, shape, torch.device(device))
        buf = self.steps.get(key)
        if buf is None or buf.dtype != dtype:
            buf = torch.zeros(shape, dtype=dtype, device=device) if fill is None else fill(*shape).to(device, dtype)
            if torch.compiler.is_compiling():  # made inside a graph: a graph output, not a buffer to keep
                return buf
            self.steps[key] = buf = _mark_static(buf)
        return buf

    def trim_steps(self, length: int) -> None:
        """Drop the `steps` entries of forwards longer than one token other than `length` (earlier prompts)."""
        for key in list(self.steps):
            n = key[2] if key[0] == "view" else (key[1][-1] if key[1] else 1)
            if n not in (1, length):
                del self.steps[key]

    def step_view(self, batch: int, length: int, device, flags: bool, image_end: bool) -> "View":
        """The kept `View` of a forward of `length` tokens on a static cache: its tensors are the `steps`
        buffers and the state's own, so a compiled step that reaches it through the patch's hooks reads
        every tensor at the same address (a View made inside a compiled hook would hold graph outputs).
        `flags`: the recipe has input flags (the state's buffer and this forward's own)."""
        key = ("view", batch, length, torch.device(device), flags, image_end)
        view = self.steps.get(key)
        stale = view is not None and (
            view.first_abs is not self.first
            or (flags and view.flags is not self.flags)
            or (image_end and view.image_end is not self.image_end)
        )
        if view is None or stale:
            view = View(
                self.step_tensor("positions", (length,), torch.long, device),
                self.first,
                self.step_tensor("pos0", (), torch.long, device),
                self.flags if flags else None,
                self.image_end if image_end else None,
                self.step_tensor("new", (batch, length), torch.uint8, device) if flags else None,
            )
            if not torch.compiler.is_compiling():
                self.steps[key] = view
        return view

    def layer_buffer(self, store: dict[int, torch.Tensor], layer: int, lead: tuple[int, ...], device) -> torch.Tensor:
        buf = self._fit(store.get(layer), lead, device)
        store[layer] = buf
        return buf


@dataclass
class View:
    """A `Forward`'s per-input tensors on one device."""

    positions: torch.Tensor  # (T,) int64 absolute positions of this forward's tokens
    first_abs: torch.Tensor  # (B,) int64 absolute position of each row's first real token
    pos0: int | torch.Tensor  # absolute position of the first token: int, or a 0-d int64 tensor
    flags: torch.Tensor | None  # (B, C) uint8 input flags by absolute position
    image_end: torch.Tensor | None  # (B,) int64 position after each row's last image token
    new: torch.Tensor | None = None  # (B, T) uint8 input flags of this forward's tokens (None: no input flags)


@dataclass
class Forward:
    """What every layer of one forward shares, built once per forward.

    Attributes:
        batch, length: B and T of this forward's tokens.
        past: tokens already in the cache as a Python int, or None when only the device knows it
            (a static cache); `pos0` then holds it as a device scalar.
        detect: run the detections made once per input (a prefill).
        kv_offsets: kv_length -> absolute position of key 0, recorded by the mask function.
        causal: kv_length -> the mask function is plain causal (no window, no extra mask function).
        padding: the (B, P) padding mask, or None.
        left_padded: the padding mask is one block of padding then one of tokens in every row (None: not checked).
        moves_to: devices the per-input tensors were moved to in this forward (tests count them).
    """

    batch: int
    length: int
    past: int | None
    detect: bool
    home: View
    state: State
    kv_offsets: dict[int, int] = field(default_factory=dict)
    causal: dict[int, bool] = field(default_factory=dict)
    padding: torch.Tensor | None = None
    left_padded: bool | None = None
    views: dict[torch.device, View] = field(default_factory=dict)
    cache: dict[tuple, Any] = field(default_factory=dict)
    moves_to: list[str] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return self.home.first_abs.device

    def on(self, device: torch.device) -> View:
        """This forward's per-input tensors on `device`: moved once per forward and device."""
        view = self.views.get(device)
        if view is not None:
            return view
        h = self.home
        if torch.device(device) == h.first_abs.device:
            view = h
        else:
            to = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
            pos0 = to(h.pos0) if torch.is_tensor(h.pos0) else h.pos0
            view = View(to(h.positions), to(h.first_abs), pos0, to(h.flags), to(h.image_end), to(h.new))
            self.moves_to.append(str(device))
        self.views[device] = view
        return view

    def shared(self, key: tuple, make) -> Any:
        """`make()`, once per forward for `key`: work every layer would otherwise repeat (first keys, key groups).

        Safe to share: a `Forward` lives for one forward, and `key` names everything `make` reads
        besides this forward's per-input tensors (a result of None is kept too).
        """
        hit = self.cache.get(key, _MISSING)
        if hit is _MISSING:
            hit = self.cache[key] = make()
        return hit

    def padding_is_left(self, view: View) -> bool:
        """Whether every row is padding then tokens (kernels may then skip the dense mask).

        Checked once per forward, and only outside torch.compile and CUDA-graph capture (it reads
        the mask on the host); there the answer is False and kernels read the dense mask.
        """
        if self.left_padded is None:
            if self.padding is None:
                self.left_padded = True
            elif torch.compiler.is_compiling() or capturing(self.padding):
                return False
            else:
                pad = self.padding != 0
                first = self.home.first_abs.to(pad.device)
                self.left_padded = bool((pad.sum(1) == pad.shape[1] - first).all())
        return self.left_padded

    def image_span(self, view: View, kv_offset: int, k_len: int) -> tuple[int, int] | None:
        """(s, e): the keys [s, e) of the layer's view are the input's one image span, in every row; or None.

        Only at a prefill (a new input of more than one token), and read on the host once per forward
        (as `padding_is_left`) outside torch.compile and CUDA-graph capture, where it is None.
        """
        if not self.detect or self.length < 2 or view.flags is None or view.image_end is None:
            return None

        def find() -> tuple[int, int] | None:
            if torch.compiler.is_compiling() or capturing(view.flags):
                return None
            image = (view.flags[:, kv_offset : kv_offset + k_len] & T.IMAGE) != 0
            pos = torch.arange(image.shape[1], device=image.device)
            first = torch.where(image, pos, image.shape[1]).amin(1)
            end = torch.where(image, pos, -1).amax(1) + 1
            rows = torch.stack([first, end, image.sum(1)], 1).tolist()
            s, e, n = rows[0]
            return (s, e) if n > 0 and e - s == n and all(r == rows[0] for r in rows) else None

        return self.shared(("image_span", kv_offset, k_len, view.flags.device), find)

    def kv_offset(self, q_len: int, k_len: int) -> int:
        """Absolute position of key 0 of a layer whose attention sees `k_len` keys for `q_len` queries."""
        off = self.kv_offsets.get(k_len)
        if off is not None:
            return off
        if self.past is not None:  # a cache that keeps the last keys (dynamic, sliding window): they end here
            return max(self.past + q_len - k_len, 0)
        return 0  # a static cache: key j is position j


_MISSING = object()


def _dense(attention_mask: Any) -> torch.Tensor | None:
    """The full-attention (B, 1|H, Q, K) bool mask among what a model receives, or None."""
    if isinstance(attention_mask, dict):
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values()), None))
    if not torch.is_tensor(attention_mask) or attention_mask.dim() != 4:
        return None
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask > -1e30


def padding_of(attention_mask: Any, length: int) -> torch.Tensor:
    """(B, length) bool: keys 0 .. length-1 that some query row may see in a dense mask (a prefill's real tokens)."""
    return _dense(attention_mask)[:, 0].any(1)[:, :length]


def first_real(attention_mask: Any, batch: int, device) -> torch.Tensor | None:
    """(B,) int64 absolute position of each row's first real token, from the masks a model receives.

    A (B, P) 0/1 padding mask gives it at every forward. A dense (B, 1, Q, K) mask, or the
    per-layer-type masks `generate` makes for a static cache (the full-attention one is read), give
    it at a prefill: the first key any row may see. None when neither says (a decoding step
    without a padding mask: the prefill's answer holds).
    """
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    if torch.is_tensor(attention_mask) and attention_mask.dim() == 2:
        pad = attention_mask.to(device) != 0
    else:
        dense = _dense(attention_mask)
        if dense is None:
            return None
        pad = dense[:, 0].any(1).to(device)
    first = pad.to(torch.uint8).argmax(1)  # the first maximum: the first real token
    return torch.where(pad.any(1), first, torch.zeros_like(first)).long()


def begin(
    state: State,
    compiled: T.CompiledRecipe,
    *,
    batch: int,
    length: int,
    device: torch.device,
    past: int | torch.Tensor,
    capacity: int,
    detect: bool,
    attention_mask: torch.Tensor | None,
    input_ids: torch.Tensor | None,
    spans: torch.Tensor | None,
) -> Forward:
    """Prepare one forward: reserve the state, write this forward's input flags, compute what layers share.

    Args:
        state: the patch's per-input state.
        compiled: the compiled recipe.
        batch, length: B and T of this forward's tokens.
        device: the input's device.
        past: tokens already in the cache: an int, or a 0-d device tensor (a static cache).
        capacity: positions the buffers must hold (the cache's length after this forward, or its maximum).
        detect: this forward starts a new input (run the once-per-input detections; reset head scales).
        attention_mask: the (B, P) padding mask, or None.
        input_ids: (B, T) ids, for input detectors (None: inputs_embeds only).
        spans: (B, S, 2) int64 highlighted [start, stop) ranges (PASTA), or None.
    Returns:
        The `Forward`.
    """
    state.reserve(batch, capacity, device)
    state.know(compiled)
    if detect:
        state.head_scale.reset()
        state.decode_plans.clear()
    known = not torch.is_tensor(past)
    # len(), not bool() of the tuple: torch 2.11's dynamo breaks the graph at bool(tuple)
    has_new = len(compiled.input_detectors) > 0 or compiled.needs_spans
    has_image = any(d.flag == T.IMAGE for d in compiled.input_detectors)
    if detect and not torch.compiler.is_compiling():  # a decoding step's kept tensors, for a compiled step
        state.trim_steps(length)
        state.step_view(batch, 1, device, has_new, has_image)
    if known:
        positions = torch.arange(past, past + length, device=device)
        pos0: int | torch.Tensor = past
        kept = None
    else:  # the cache's length on the device: this forward's tensors are kept buffers (`State.steps`)
        kept = state.step_view(batch, length, device, has_new, has_image)
        pos0 = kept.pos0
        pos0.copy_(past)  # the cache advances its own copy in place
        offsets = state.step_tensor("offsets", (length,), torch.long, device, fill=torch.arange)
        positions = kept.positions
        torch.add(offsets, pos0, out=positions)
    flags = None
    new = None  # (B, T) uint8 input flags of this forward's tokens
    if has_new:
        parts = [det.detect(input_ids).to(torch.uint8) * det.flag for det in compiled.input_detectors]
        if spans is not None:
            pos = positions.view(1, length, 1)
            inside = (pos >= spans[:, None, :, 0]) & (pos < spans[:, None, :, 1])  # (B, T, S)
            parts.append(inside.any(-1).to(torch.uint8) * T.SPAN)
        new = parts[0] if parts else torch.zeros(batch, length, dtype=torch.uint8, device=device)
        for part in parts[1:]:
            new = new | part
        if kept is not None:
            new = kept.new.copy_(new)
        state.flags.index_copy_(1, positions, new)
        flags = state.flags
    image_end = None
    if has_image:
        image_end = state.image_end
        if detect or length > 1:  # every position up to this forward's last
            cap = state.capacity
            pos = torch.arange(cap, device=device)
            seen = ((state.flags & T.IMAGE) != 0) & (pos < positions[-1] + 1).view(1, cap)
            image_end.copy_(torch.where(seen, pos.view(1, cap), torch.full_like(pos, -1).view(1, cap)).amax(1) + 1)
        else:  # a decoding step: the end moves only where its own token is an image token
            torch.maximum(image_end, ((new[:, 0] & T.IMAGE) != 0) * (positions + 1), out=image_end)
    padding = attention_mask if torch.is_tensor(attention_mask) and attention_mask.dim() == 2 else None
    # a decoding step's padding mask only appends a 1 to each row: the first real tokens stay the prefill's
    renew = detect or (padding is not None and (length > 1 or not state.first_known))
    first = first_real(attention_mask, batch, device) if renew else None
    if first is not None:
        state.first.copy_(first)
        state.first_known = True
    home = kept if kept is not None else View(positions, state.first, pos0, flags, image_end, new)
    return Forward(
        batch,
        length,
        past if known else None,
        detect,
        home,
        state,
        padding=padding,
    )


def record_layer_detection(fwd: Forward, layer: int, found: torch.Tensor) -> None:
    """Write a layer-input detection (B, T) bool of this forward's tokens at their positions.

    A prefill first clears the whole buffer (a previous, longer input may have flagged positions
    this one reaches later), so a later forward whose detectors all run at prefill only need not
    write its positions: they already hold "not flagged".
    """
    view = fwd.on(found.device)
    buf = fwd.state.layer_buffer(fwd.state.hsink, layer, (fwd.batch,), found.device)
    if fwd.detect:
        buf.zero_()
    buf.index_copy_(1, view.positions, found.to(torch.uint8))


def plan_on(cache: dict, plan: T.LayerPlan, device: torch.device) -> T.LayerPlan:
    """The plan's tensors on `device`, cached in `cache` (one copy per layer and device, ever)."""
    key = (plan.layer, device)
    hit = cache.get(key)
    if hit is None:
        to = lambda t: None if t is None else t.to(device)  # noqa: E731
        moves = tuple(replace(m, keep=m.keep.to(device)) for m in plan.moves)
        hit = replace(plan, bias=to(plan.bias), moves=moves, out_scale=to(plan.out_scale), out_shift=to(plan.out_shift))
        object.__setattr__(hit, "group_lut", to(plan.group_lut))  # derived anew (on the CPU) by replace
        cache[key] = hit
    return hit


def key_flags(plan: T.LayerPlan, fwd: Forward, view: View, layer: int, heads: int, k_len: int, kv_offset: int):
    """(B, 1|H, K) uint8 flags of a layer's keys, which sit at absolute positions kv_offset .. kv_offset + K.

    No key is an attention sink here: a prefill's detection adds them (`layer_tables`).
    """
    B = fwd.batch
    used = plan.used
    device = view.first_abs.device
    lo, hi = kv_offset, kv_offset + k_len
    flags = torch.zeros(B, 1, k_len, dtype=torch.uint8, device=device)
    if used & T.FIRST:
        keys = torch.arange(lo, hi, device=device)
        flags |= (keys.view(1, 1, k_len) == view.first_abs.view(B, 1, 1)).to(torch.uint8) * T.FIRST
    if used & (T.SPAN | T.IMAGE) and view.flags is not None:
        flags |= view.flags[:, None, lo:hi] & (used & (T.SPAN | T.IMAGE))
    if used & T.HSINK:
        if layer in fwd.state.hsink:
            buf = fwd.state.layer_buffer(fwd.state.hsink, layer, (B,), device)
            flags |= buf[:, None, lo:hi] * T.HSINK
    if used & T.ACTSINK:
        flags = flags.expand(B, heads, k_len).clone()
    return flags


def _token_flags(plan: T.LayerPlan, fwd: Forward, view: View, layer: int) -> torch.Tensor:
    """(B, 1, T) uint8 flags of this forward's tokens, FIRST left out; no token after a prefill is an attention sink."""
    used = plan.used
    device = view.first_abs.device
    flags = torch.zeros(fwd.batch, 1, fwd.length, dtype=torch.uint8, device=device)
    if used & (T.SPAN | T.IMAGE) and view.flags is not None:
        flags |= view.flags.index_select(1, view.positions)[:, None] & (used & (T.SPAN | T.IMAGE))
    if used & T.HSINK and layer in fwd.state.hsink:
        buf = fwd.state.layer_buffer(fwd.state.hsink, layer, (fwd.batch,), device)
        flags |= buf.index_select(1, view.positions)[:, None] * T.HSINK
    return flags


def _first_bits(plan: T.LayerPlan, view: View, k_len: int, kv_offset: int) -> torch.Tensor:
    """(B, 1, K) uint8: the FIRST flag's group bit on each row's first real token among the keys, else 0."""
    keys = torch.arange(kv_offset, kv_offset + k_len, device=view.first_abs.device)
    first = keys.view(1, 1, k_len) == view.first_abs.view(-1, 1, 1)
    return first.to(torch.uint8) << plan.flags.index(T.FIRST)


def group_ids(plan: T.LayerPlan, flags: torch.Tensor) -> torch.Tensor | None:
    """Key group ids (flags packed in the plan's order), or None when the layer has one group.

    One lookup in the plan's table of every flag byte's group (`LayerPlan.group_lut`) when it is on
    the flags' device (`plan_on` puts it there), else bit by bit.
    """
    if not plan.flags:
        return None
    lut = plan.group_lut
    if lut is not None and lut.device == flags.device:
        return lut[flags.long()]
    group = torch.zeros_like(flags)
    for k, bit in enumerate(plan.flags):
        group |= ((flags & bit) != 0).to(torch.uint8) << k
    return group


def layer_tables(
    plan: T.LayerPlan | None,
    fwd: Forward,
    layer: int,
    *,
    device: torch.device,
    heads: int,
    k_len: int,
    kv_offset: int,
    head_scale: torch.Tensor | None = None,
    detect_sinks: Any = None,
) -> T.LayerTables:
    """One layer's tables for this forward, on `device` (the device of that layer's query).

    Args:
        plan: the layer's plan (already on `device`), or None (only per-input head scales).
        fwd: this forward.
        layer: the layer index.
        device: where the tables are built.
        heads: H, the layer's query heads.
        k_len: K, the keys the layer attends to; kv_offset: the absolute position of key 0.
        head_scale: (B, H) per-input output scales, or None.
        detect_sinks: for a prefill of a layer with attention detectors, a callable
            ``(pre_tables) -> (B, H, K) bool`` (the column-score detection); it runs and its result
            is kept for the decoding steps. At other forwards the new positions are recorded as no sink.
    Returns:
        The `LayerTables`.
    """
    view = fwd.on(device)
    first_key = fwd.shared(("first_key", kv_offset, device), lambda: _first_key(view, kv_offset))
    scale = head_scale.to(device, torch.float32) if head_scale is not None else None
    if plan is None:
        return T.LayerTables(None, first_key, 1, None, (), scale, None)
    if not plan.flags:  # one group
        return _finish(plan, fwd, view, None, first_key, heads, device, scale, (kv_offset, k_len))
    used = plan.used
    if not used & PER_LAYER:  # key groups from per-input flags alone: shared by layers of equal flags
        key = ("groups", plan.flags, k_len, kv_offset, device)
        if plan.flags == (T.FIRST,):  # the first real token alone (ZeroTuning): its group bit is the group id
            groups = fwd.shared(key, lambda: _first_bits(plan, view, k_len, kv_offset))
        else:
            groups = fwd.shared(
                key, lambda: group_ids(plan, key_flags(plan, fwd, view, layer, heads, k_len, kv_offset))
            )
        return _finish(plan, fwd, view, groups, first_key, heads, device, scale, (kv_offset, k_len))
    B, lo, hi = fwd.batch, kv_offset, kv_offset + k_len
    buf, stack_key = fwd.state.group_buffer(plan, layer, heads if used & T.ACTSINK else 1, device)
    if fwd.detect:  # a prefill: every key the layer sees, with the attention sinks found now
        flags = key_flags(plan, fwd, view, layer, heads, k_len, kv_offset)
        if detect_sinks is not None:
            pre = T.LayerTables(group_ids(plan, flags), first_key, plan.n_groups, plan.bias, (), None, None)
            flags = flags | detect_sinks(pre).to(torch.uint8) * T.ACTSINK
        groups = group_ids(plan, flags)
        buf[:, :, lo:hi] = group_ids(plan, flags & (0xFF ^ T.FIRST)) if used & T.FIRST else groups
        buf[:, :, hi:] = 0  # positions a later forward may leave unwritten (below) hold group 0
        return _finish(plan, fwd, view, groups, first_key, heads, device, scale, (kv_offset, k_len))
    # a later forward (decoding): write this forward's positions, read the layer's keys as a view.
    # Its tokens are never attention sinks, and hidden-state sinks only where a layer detector also
    # runs after the prefill; elsewhere their groups come from per-input flags alone, the same in
    # every layer of equal flags: computed once per forward and written into every such layer's
    # buffer at once (their stack), by the first of them. Without per-input flags (ACT, or no
    # input flag written in this forward) that group is 0, which the prefill left at every later
    # position: nothing to write.
    if used & T.HSINK and plan.hsink_after_prefill:
        new = group_ids(plan, _token_flags(plan, fwd, view, layer))
        buf.index_copy_(2, view.positions, new.expand(B, buf.shape[1], fwd.length))
    elif used & (T.SPAN | T.IMAGE) and view.new is not None:

        def write() -> None:
            # this forward's input flags: bits the plan does not use map to no group bit
            new = fwd.shared(("new_groups", plan.flags, device), lambda: group_ids(plan, view.new[:, None]))
            stack = fwd.state.stacks[stack_key]
            stack.index_copy_(3, view.positions, new.expand(*stack.shape[:3], fwd.length))

        fwd.shared(("new_groups_written", stack_key), write)
    groups = buf[:, :, lo:hi]
    if used & T.FIRST:
        groups = groups | fwd.shared(
            ("first_bits", plan.flags.index(T.FIRST), k_len, kv_offset, device),
            lambda: _first_bits(plan, view, k_len, kv_offset),
        )
    return _finish(plan, fwd, view, groups, first_key, heads, device, scale, (kv_offset, k_len))


def _first_key(view: View, kv_offset: int) -> torch.Tensor:
    return (view.first_abs - kv_offset).clamp_min(-1)  # -1: the first real token is not among the keys


def _finish(plan, fwd: Forward, view: View, groups, first_key, heads: int, device, scale, keys) -> T.LayerTables:
    moves = plan.moves
    span = None
    if moves and plan.bias is None and all(m.after_image for m in moves):
        span = fwd.image_span(view, *keys)  # rows before the span's end are not edited: kernels may split there
    if plan.moves_after_image:  # per-input row starts; the plan's own tuple otherwise (kernels memoise it)
        starts = view.image_end
        if starts is None:
            starts = fwd.shared(("no_image", device), lambda: torch.zeros_like(first_key))
        # the same tuple while the row starts are the same buffer (the state's, at every step of an input),
        # outside torch.compile (which builds the tables into its graph once)
        compiling = torch.compiler.is_compiling()
        kept = None if compiling else fwd.state.row_moves.get(plan.layer)
        if kept is not None and kept[0] is starts and kept[1] is plan.moves:
            moves = kept[2]
        else:
            moves = tuple(
                T.Move(m.src, m.dst, m.keep, m.gate, after_image=True, row_start=starts, live=m.live)
                if m.after_image
                else m
                for m in moves
            )
            if not compiling:
                fwd.state.row_moves[plan.layer] = (starts, plan.moves, moves)
    out_scale = plan.out_scale
    if scale is not None:
        base = out_scale if out_scale is not None else torch.ones(heads, device=device)
        out_scale = base.view(1, heads) * scale
    return T.LayerTables(
        key_group=groups,
        first_key=first_key,
        n_groups=plan.n_groups,
        bias=plan.bias,
        moves=moves,
        out_scale=out_scale,
        out_shift=plan.out_shift,
        image_span=span,
    )
