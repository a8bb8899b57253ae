"""The one form every recipe compiles to: per-layer, per-query-head parameter tables.

For one layer and one query head, every method is

1. a partition of each row's keys into groups, from *key flags*: one bit per
   property a key can have (first real token, inside a highlighted span, image
   token, hidden-state sink, detected attention sink). A layer uses only the
   bits its rules name; with `n` bits there are ``G = 2**n`` groups and a key's
   group id is its used bits packed in order (`LayerPlan.flags`);
2. a logit bias per (head, group), added before the softmax (ZeroTuning, PASTA);
3. mass-preserving moves between groups, after the softmax, in order
   (ACT, VAR): a move keeps a fraction `keep[h]` of the mass of its source
   groups and gives the freed mass to its destination groups in proportion to
   their mass, optionally only in rows whose group masses pass a `Gate` and
   only in rows at or after a row start (VAR edits rows after the image);
4. a scale and shift of the head's output (pruning: 0 or the mean, VHR: alpha).

A method compiles to effects of these kinds (`Bias`, `MoveEffect`, `Scale`), to
detectors that set key flags per input (`Detect`), and to forward hooks that
compute per-input statistics before each forward of the model (`ForwardHook`,
VHR's per-input head choice); each method declares the kinds it emits
(`attnedit.interventions.registry.Method.emits`).

Order of effects when several interventions meet in one head: all biases add;
moves apply in recipe order, each on the masses the previous ones left; output
scales multiply and shifts follow in recipe order.

`compile_recipe` turns a `Recipe` into a `CompiledRecipe` (static, once per
model); `attnedit.patch` turns a `LayerPlan` into `LayerTables` at every
forward (the key groups of this input), which a backend in `attnedit.kernels`
executes.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Protocol, Sequence

from attnedit.interventions import registry

from .errors import AttneditError
from .lazy import torch
from .modelinfo import ModelInfo

# --------------------------------------------------------------------------- key flags

FIRST = 1  # the row's first real (non-padding) token
SPAN = 2  # inside a user-highlighted span (PASTA)
IMAGE = 4  # an image placeholder token (VLMs)
HSINK = 8  # a massive-activation sink of this layer's input hidden state (VAR)
ACTSINK = 16  # a detected attention sink of this head (ACT); never the first token
PER_LAYER = HSINK | ACTSINK  # flags found per layer (the others are per input: the same in every layer)
FLAG_NAMES = {FIRST: "first", SPAN: "span", IMAGE: "image", HSINK: "hidden_sink", ACTSINK: "attn_sink"}


@dataclass(frozen=True)
class KeySet:
    """A set of keys by their flags: all of `on` set and none of `off` set."""

    on: int = 0
    off: int = 0

    def bits(self) -> int:
        return self.on | self.off

    def holds(self, flags: int) -> bool:
        return (flags & self.on) == self.on and (flags & self.off) == 0


# --------------------------------------------------------------------------- effects: what a method compiles to


@dataclass(frozen=True)
class Bias:
    """Add `value` to the logits of keys in `keys`, for `heads` of `layer`."""

    layer: int
    heads: tuple[int, ...]
    keys: KeySet
    value: float

    KIND: ClassVar[str] = "logit bias"


@dataclass(frozen=True)
class Gate:
    """Edit a row only if mass(num) / mass(den) <= max_ratio and mass(den) >= min_den."""

    num: KeySet
    den: KeySet
    max_ratio: float
    min_den: float


@dataclass(frozen=True)
class MoveEffect:
    """Keep `keep` of the mass of `src`, give the rest to `dst` in proportion."""

    layer: int
    heads: tuple[int, ...]
    src: KeySet
    dst: KeySet
    keep: float
    gate: Gate | None = None
    after_image: bool = False  # edit only rows after the last image token

    KIND: ClassVar[str] = "attention moves"


@dataclass(frozen=True)
class Scale:
    """o_h <- scale * o_h + shift_h for `heads` of `layer` (shift: (n_heads_selected, head_dim) or None)."""

    layer: int
    heads: tuple[int, ...]
    scale: float
    shift: torch.Tensor | None = None

    KIND: ClassVar[str] = "output scale"


class Detector(Protocol):
    """A per-input detection that sets a key flag.

    `where` says when the patch calls it:
      - "input":       ``detect(input_ids) -> (B, T) bool``, at each forward of the whole model;
      - "layer_input": ``detect(hidden, flags) -> (B, T) bool``, at each forward of the layer (hidden: (B, T, D);
                       flags: (B, T) uint8 input flags of these tokens, e.g. IMAGE, or None); a detector
                       with ``prefill_only = True`` runs at prefill only (new tokens are then never flagged);
      - "attention":   ``detect(scores, counts, first_key) -> (B, H, K) bool``, at prefill only,
                       from column scores of the attention map (ACT).
    """

    flag: int
    where: str


@dataclass(frozen=True)
class Detect:
    """Attach a detector to a layer (or to the model, layer=None, for where='input')."""

    layer: int | None
    detector: Any

    KIND: ClassVar[str] = "per-input detection"


@dataclass(frozen=True)
class ForwardHook:
    """Call ``hook.on_forward(patch, args, kwargs, past)`` before every forward of the patched model.

    For per-input statistics that set runtime tables (VHR's head choice writes `patch.state.head_scale`).
    """

    hook: Any

    KIND: ClassVar[str] = "per-input head statistics"


Effect = Bias | MoveEffect | Scale | Detect | ForwardHook
EFFECT_KINDS = (Bias, MoveEffect, Scale, Detect, ForwardHook)


# --------------------------------------------------------------------------- compiled, static plan of one layer


@dataclass(frozen=True)
class Move:
    """A compiled move: group bitmasks over the layer's G groups (bit g = group g)."""

    src: int
    dst: int
    keep: torch.Tensor  # (H,) fp32; 1.0 = head untouched
    gate: tuple[int, int, float, float] | None = None  # (num groups, den groups, max_ratio, min_den)
    after_image: bool = False
    row_start: torch.Tensor | None = None  # runtime: (B,) absolute first edited query position
    live: bool | None = None  # whether keep != 1 for some head (None: not known, the kernels read keep)


@dataclass(frozen=True)
class LayerPlan:
    layer: int
    n_heads: int
    flags: tuple[int, ...]  # flag bits that define groups; group bit k <-> flags[k]
    bias: torch.Tensor | None  # (H, G) fp32
    moves: tuple[Move, ...]
    out_scale: torch.Tensor | None  # (H,) fp32
    out_shift: torch.Tensor | None  # (H, D) fp32
    detectors: tuple[Any, ...] = ()  # "layer_input" and "attention" detectors of this layer
    # derived once (a decoding step reads them in every layer): see `__post_init__`
    layer_detectors: tuple[Any, ...] = field(init=False, repr=False, compare=False)
    detects_after_prefill: bool = field(init=False, repr=False, compare=False)
    hsink_after_prefill: bool = field(init=False, repr=False, compare=False)
    moves_after_image: bool = field(init=False, repr=False, compare=False)
    group_lut: torch.Tensor | None = field(init=False, repr=False, compare=False)
    used: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        """The facts a decoding step asks of the plan in every layer, derived once.

        layer_detectors: the "layer_input" detectors. detects_after_prefill: whether one of them also flags
        tokens after the prefill (one not `prefill_only`); False with none. hsink_after_prefill: whether
        hidden-state sinks may be flagged after the prefill: unless every layer detector is `prefill_only`
        (with none, whatever wrote the layer's buffer is read, as at every position). moves_after_image:
        whether a move edits only the rows after each input's image tokens (per-input row starts).
        group_lut: (256,) uint8, the group id of every byte of key flags (`attnedit.runtime.group_ids`), or
        None with one group. used: the flag bits the groups are made of, or-ed.
        """
        layer = tuple(d for d in self.detectors if d.where == "layer_input")
        after = any(not getattr(d, "prefill_only", False) for d in layer)
        object.__setattr__(self, "layer_detectors", layer)
        object.__setattr__(self, "detects_after_prefill", after)
        object.__setattr__(self, "hsink_after_prefill", not layer or after)
        object.__setattr__(self, "moves_after_image", any(m.after_image for m in self.moves))
        lut = None
        if self.flags:
            ids = [sum(1 << k for k, bit in enumerate(self.flags) if f & bit) for f in range(256)]
            lut = torch.tensor(ids, dtype=torch.uint8)
        object.__setattr__(self, "group_lut", lut)
        object.__setattr__(self, "used", sum(self.flags))

    @property
    def n_groups(self) -> int:
        return 1 << len(self.flags)

    def group_flags(self, g: int) -> int:
        """The flag bits of group id g."""
        return sum(f for k, f in enumerate(self.flags) if g >> k & 1)

    def groups_where(self, keys: KeySet) -> int:
        return sum(1 << g for g in range(self.n_groups) if keys.holds(self.group_flags(g)))

    @property
    def attention_detectors(self) -> tuple[Any, ...]:
        return tuple(d for d in self.detectors if d.where == "attention")

    @property
    def is_static(self) -> bool:
        """Only output scales (foldable into o_proj): no bias, no move, no detection."""
        return self.bias is None and not self.moves and not self.detectors


@dataclass(frozen=True)
class CompiledRecipe:
    layers: dict[int, LayerPlan]
    input_detectors: tuple[Any, ...] = ()
    needs_spans: bool = False
    forward_hooks: tuple[Any, ...] = ()  # objects with .on_forward(patch, args, kwargs) (per-input head statistics)

    def __bool__(self) -> bool:
        return bool(self.layers) or bool(self.forward_hooks)

    @functools.cached_property
    def group_members(self) -> dict[tuple, tuple[tuple[int, ...], dict[int, int]]]:
        """(plan flags, hidden sinks flagged after the prefill) -> (layers, layer -> slot) of the layers whose
        key groups are kept per layer (hidden-state or attention sinks): `attnedit.runtime.State` stacks each
        set's buffers, so that a decoding step writes one set's new groups in one operation."""
        sets: dict[tuple, list[int]] = {}
        for i, plan in sorted(self.layers.items()):
            if plan.used & PER_LAYER:
                sets.setdefault((plan.flags, plan.hsink_after_prefill), []).append(i)
        return {k: (tuple(v), {layer: s for s, layer in enumerate(v)}) for k, v in sets.items()}


# --------------------------------------------------------------------------- runtime tables of one forward


@dataclass(slots=True)  # not frozen: made per layer and step, where a frozen init costs twice the time; never changed
class LayerTables:
    """What a backend executes for one layer and one forward.

    Attributes:
        key_group: (B, Hg, K) uint8 group id of every key (Hg = 1 or H), or None when G == 1.
        first_key: (B,) int64 key index of each row's first real token (-1: not in view).
        n_groups: G.
        bias: (H, G) fp32 logit bias or None.
        moves: compiled moves, with `row_start` filled when they edit rows after the image.
        out_scale: (H,) or (B, H) fp32, or None.
        out_shift: (H, D) fp32, or None.
        image_span: (s, e) host key indices of the input's one image span, the same in every batch row,
            at a prefill whose moves edit only rows from e on (their row starts); None otherwise. A
            backend may then attend to the span's keys apart (`kernels.triton_split`).
    """

    key_group: torch.Tensor | None
    first_key: torch.Tensor
    n_groups: int
    bias: torch.Tensor | None
    moves: tuple[Move, ...]
    out_scale: torch.Tensor | None
    out_shift: torch.Tensor | None
    image_span: tuple[int, int] | None = None

    @property
    def is_identity(self) -> bool:
        return self.bias is None and not self.moves and self.out_scale is None and self.out_shift is None

    def without_moves(self) -> "LayerTables":
        return replace(self, moves=(), out_scale=None, out_shift=None)


# --------------------------------------------------------------------------- compile


def compile_recipe(recipe, info: ModelInfo, model: torch.nn.Module | None = None) -> CompiledRecipe:
    """Compile a validated recipe into per-layer plans for one model.

    Args:
        recipe: a `Recipe` (checked against `info` by the caller).
        info: the model's shape.
        model: the loaded model, for methods whose compile step reads weights (optional).
    Returns:
        A `CompiledRecipe`; layers without effects are absent (they run unpatched).
    """
    effects: list[Effect] = []
    needs_spans = False
    for spec in recipe.interventions:
        method = registry.get(spec.type)
        for item in method.compile(spec, info, model):
            if not isinstance(item, method.emits) or not isinstance(item, EFFECT_KINDS):
                declared = ", ".join(k.__name__ for k in method.emits)
                raise AttneditError(
                    f"method {method.name!r} compiled to a {type(item).__name__}, not one of the effect kinds it "
                    f"declares ({declared})"
                )
            effects.append(item)
        needs_spans |= method.needs_spans
    return build_plans(effects, info, needs_spans=needs_spans)


def build_plans(effects: Sequence[Effect], info: ModelInfo, needs_spans: bool = False) -> CompiledRecipe:
    """Per-layer plans from effects; forward hooks are kept apart, in order."""
    H, D = info.n_heads, info.head_dim
    by_layer: dict[int, list[Effect]] = {}
    input_detectors = []
    hooks: list[Any] = []
    for e in effects:
        if isinstance(e, ForwardHook):
            hooks.append(e.hook)
            continue
        if isinstance(e, Detect) and e.layer is None:
            if all(type(d) is not type(e.detector) or d != e.detector for d in input_detectors):
                input_detectors.append(e.detector)
            continue
        by_layer.setdefault(e.layer, []).append(e)
    plans = {}
    for layer, items in sorted(by_layer.items()):
        bits = 0
        for e in items:
            if isinstance(e, Bias):
                bits |= e.keys.bits()
            elif isinstance(e, MoveEffect):
                bits |= e.src.bits() | e.dst.bits()
                if e.gate is not None:
                    bits |= e.gate.num.bits() | e.gate.den.bits()
        flags = tuple(f for f in sorted(FLAG_NAMES) if bits & f)
        plan = LayerPlan(layer, H, flags, None, (), None, None)
        G = plan.n_groups
        bias = torch.zeros(H, G)
        has_bias = False
        moves = []
        scale = torch.ones(H)
        shift = torch.zeros(H, D)
        has_scale = has_shift = False
        detectors = []
        for e in items:
            heads = list(e.heads) if not isinstance(e, Detect) else []
            if isinstance(e, Bias):
                mask = torch.tensor([e.keys.holds(plan.group_flags(g)) for g in range(G)])
                for h in heads:
                    bias[h, mask] += e.value
                has_bias |= e.value != 0.0
            elif isinstance(e, MoveEffect):
                keep = torch.ones(H)
                keep[heads] = float(e.keep)
                gate = None
                if e.gate is not None:
                    gate = (
                        plan.groups_where(e.gate.num),
                        plan.groups_where(e.gate.den),
                        float(e.gate.max_ratio),
                        float(e.gate.min_den),
                    )
                live = bool((keep != 1).any())  # known here, so no decoding step reads keep back from the device
                src, dst = plan.groups_where(e.src), plan.groups_where(e.dst)
                moves.append(Move(src, dst, keep, gate, e.after_image, live=live))
            elif isinstance(e, Scale):
                for i, h in enumerate(heads):
                    scale[h] *= e.scale
                    shift[h] *= e.scale
                    if e.shift is not None:
                        shift[h] += e.shift[i].float()
                has_scale |= e.scale != 1.0
                has_shift |= e.shift is not None
            elif isinstance(e, Detect):
                detectors.append(e.detector)
        plans[layer] = LayerPlan(
            layer=layer,
            n_heads=H,
            flags=flags,
            bias=bias if has_bias else None,
            moves=tuple(moves),
            out_scale=scale if (has_scale or has_shift) else None,
            out_shift=shift if has_shift else None,
            detectors=_merge_detectors(detectors),
        )
    return CompiledRecipe(plans, tuple(input_detectors), needs_spans, tuple(hooks))


def _merge_detectors(detectors: list) -> tuple:
    """Detectors of the same flag in one layer merge (ACT thresholds are per head)."""
    merged: dict[tuple, Any] = {}
    for d in detectors:
        key = (d.flag, d.where)
        merged[key] = merged[key].merge(d) if key in merged else d
    return tuple(merged.values())


def log_or_neg_inf(x: float) -> float:
    return math.log(x) if x > 0 else float("-inf")


@dataclass(slots=True)  # not frozen, as LayerTables: made per layer and step; never changed
class MaskInfo:
    """Which keys each query row may see, in the forms backends want.

    Attributes:
        dense: (B, 1, Q, K) bool, True = may attend; None = plain causal (no padding).
        q_offset: absolute position of query row 0: an int, or a 0-d int64 device tensor (a static cache
            keeps it there; decode kernels read it so that a captured CUDA graph replays right).
        kv_offset: absolute position of key 0 (> 0 when a sliding-window cache dropped old keys).
        kv_start: (B,) index of each row's first real key when the mask is exactly causal plus
            left padding (kernels can use it instead of reading `dense`); None otherwise.
        first_abs: (B,) absolute position of each row's first real token.
    """

    dense: torch.Tensor | None
    q_offset: int | torch.Tensor
    kv_offset: int
    kv_start: torch.Tensor | None
    first_abs: torch.Tensor

    @property
    def first_key(self) -> torch.Tensor:
        k = self.first_abs - self.kv_offset
        return torch.where(k >= 0, k, torch.full_like(k, -1))
