"""Patch a model's attention with a recipe, through transformers' own attention interface.

`Patch.apply` registers an attention function and its mask function under a
name of its own (`AttentionInterface.register`, `AttentionMaskInterface.register`)
and switches the text decoder to it with `model.set_attn_implementation`;
`Patch.remove` switches back and unregisters. No model class is copied or
changed. Per-input detections (image tokens, hidden-state sinks) run in
forward pre-hooks, which `remove` takes off again.

Layers the recipe does not touch, and attention modules outside the text
decoder (a vision tower), run transformers' SDPA path unchanged.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from attnedit.kernels import BACKENDS, choose, dispatch, reference

from . import tables as T
from .errors import AttneditError, BackendError
from .modelinfo import ModelInfo, decoder_layers, text_decoder
from .recipe import Recipe

log = logging.getLogger("attnedit")
_COUNTER = itertools.count()
_ACTIVE: "weakref.WeakKeyDictionary[torch.nn.Module, Patch]" = weakref.WeakKeyDictionary()


@dataclass
class _MaskMeta:
    """What our mask function knows and the attention function needs (attached to the mask tensor)."""

    first_abs: torch.Tensor  # (B,) absolute position of each row's first real token
    q_offset: int
    kv_offset: int
    plain_left_pad: bool  # exactly causal + left padding (no window, no extra mask functions)


@dataclass
class _State:
    """Per-input detections, kept from prefill for the decoding steps. Positions are absolute."""

    input_flags: torch.Tensor | None = None  # (B, P) uint8: SPAN, IMAGE
    layer_flags: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, P) uint8: HSINK
    head_flags: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H, P) bool: ACTSINK
    pending: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, T) bool from layer pre-hooks
    head_scale: dict[int, torch.Tensor] = field(default_factory=dict)  # (B, H) per-input output scales
    image_end: torch.Tensor | None = None  # (B,) absolute position after the last image token
    past: int = 0  # tokens already in the cache at this forward (0 = prefill)


class Patch:
    """A recipe applied to a model, reversibly.

    Use as a context manager, or call `apply()` and `remove()`::

        with attnedit.patch(model, recipe):
            out = model(**batch)

    Args:
        model: a loaded transformers model (causal LM or vision-language model).
        recipe: a `Recipe`, or a path to a recipe YAML.
        backend: "auto" (Triton on CUDA, the reference elsewhere), "triton" or "reference";
            default: the recipe's `backend` key.
        spans: highlighted token ranges per batch row, for PASTA (see `set_spans`).
    Raises:
        RecipeError: the recipe names layers or heads the model lacks, or a method the model cannot run.
        BackendError: an unknown backend.
    """

    def __init__(self, model: torch.nn.Module, recipe: Recipe | str | Path, backend: str | None = None, spans=None):
        if not isinstance(recipe, Recipe):
            recipe = Recipe.from_yaml(recipe)
        self.model = model
        self.recipe = recipe
        self.info = ModelInfo.from_config(model.config, name=getattr(model, "name_or_path", "") or "")
        recipe.check_model(self.info)
        self.backend = backend or recipe.backend
        if self.backend not in BACKENDS:
            raise BackendError(f"unknown backend {self.backend!r}; allowed: {', '.join(BACKENDS)}")
        self.compiled = T.compile_recipe(recipe, self.info, model)
        self.name = f"attnedit_{next(_COUNTER)}"
        self.state = _State()
        self.spans: list[list[tuple[int, int]]] | None = None
        self.capture: dict[int, dict[str, torch.Tensor]] | None = None  # set to {} to record maps (inspect)
        self._hooks: list[Any] = []
        self._saved: Any = None
        self._layer_of: dict[int, int] = {}
        self._device_plans: dict[tuple[int, str], T.LayerPlan] = {}
        self._backend_for: dict[str, str] = {}
        if spans is not None:
            self.set_spans(spans)

    # ------------------------------------------------------------------ lifecycle
    @property
    def active(self) -> bool:
        return self._saved is not None

    def apply(self) -> "Patch":
        """Register the attention function and switch the model to it. Returns self."""
        if self.active:
            return self
        if self.model in _ACTIVE:
            raise AttneditError(
                "this model is already patched by attnedit; remove that patch first (patches do not nest)"
            )
        layers = decoder_layers(self.model)
        self._layer_of = {id(layer.self_attn): i for i, layer in enumerate(layers)}
        AttentionInterface.register(self.name, self._attention)
        AttentionMaskInterface.register(self.name, self._mask)
        text_cfg = text_decoder(self.model).config
        saved = self._implementations(text_cfg)
        try:
            self.model.set_attn_implementation(self._request(text_cfg, self.name))
            if text_cfg._attn_implementation != self.name:
                raise AttneditError(
                    f"{type(self.model).__name__} does not let attnedit set its attention implementation "
                    "(it does not use transformers' AttentionInterface)"
                )
            self._hooks.append(self.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
            for i, layer in enumerate(layers):
                plan = self.compiled.layers.get(i)
                if plan is not None and plan.layer_detectors:
                    self._hooks.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        except BaseException:
            self._restore(saved, text_cfg)
            raise
        self._saved = (saved, text_cfg)
        _ACTIVE[self.model] = self
        return self

    def remove(self) -> None:
        """Restore the original attention implementation and take every hook off."""
        if not self.active:
            return
        saved, text_cfg = self._saved
        self._restore(saved, text_cfg)
        self._saved = None
        _ACTIVE.pop(self.model, None)
        self.reset()

    def reset(self) -> None:
        """Forget per-input detections (they are also reset at every prefill)."""
        self.state = _State()

    def __enter__(self) -> "Patch":
        return self.apply()

    def __exit__(self, *exc) -> None:
        self.remove()

    def _implementations(self, text_cfg) -> tuple[str, str]:
        return (self.model.config._attn_implementation, text_cfg._attn_implementation)

    def _request(self, text_cfg, impl: str):
        """set_attn_implementation's argument that changes only the text decoder."""
        if text_cfg is self.model.config:
            return impl
        for key in self.model.config.sub_configs:
            if getattr(self.model.config, key, None) is text_cfg:
                return {key: impl}
        return impl

    def _restore(self, saved, text_cfg) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        top, text = saved
        try:
            request = self._request(text_cfg, text)
            if isinstance(request, dict):
                request[""] = top
            self.model.set_attn_implementation(request)
        finally:
            AttentionInterface._global_mapping.pop(self.name, None)
            AttentionMaskInterface._global_mapping.pop(self.name, None)

    # ------------------------------------------------------------------ inputs
    def set_spans(self, spans: Sequence[Sequence[tuple[int, int]]] | None) -> None:
        """Set PASTA's highlighted token ranges, one list of [start, stop) per batch row.

        Positions index the `input_ids` the model receives (padding included).
        They hold until changed; `None` clears them.
        """
        if spans is None:
            self.spans = None
            return
        clean = []
        for row, ranges in enumerate(spans):
            out = []
            for r in ranges:
                start, stop = int(r[0]), int(r[1])
                if not 0 <= start < stop:
                    raise AttneditError(f"span {r!r} of row {row} is not a range [start, stop) with 0 <= start < stop")
                out.append((start, stop))
            clean.append(out)
        self.spans = clean

    def _on_model_forward(self, module, args, kwargs):
        """Model pre-hook: flags from the input ids and spans, for this forward's tokens."""
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            return None
        B, Tn = ref.shape[:2]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = int(cache.get_seq_length()) if cache is not None and hasattr(cache, "get_seq_length") else 0
        if past == 0:
            self.state = _State()
        self.state.past = past
        flags = torch.zeros(B, Tn, dtype=torch.uint8, device=ref.device)
        for det in self.compiled.input_detectors:
            if ids is None:
                raise AttneditError(f"{type(det).__name__} needs input_ids; this forward received only inputs_embeds")
            flags |= det.detect(ids).to(torch.uint8) * det.flag
        if self.compiled.needs_spans:
            if self.spans is None and past == 0:
                log.warning("the recipe highlights spans (PASTA) but no spans were given: every key gets the bias")
            if self.spans is not None:
                if len(self.spans) != B:
                    raise AttneditError(f"spans were given for {len(self.spans)} rows but the batch has {B}")
                pos = torch.arange(past, past + Tn, device=ref.device)
                for b, ranges in enumerate(self.spans):
                    for start, stop in ranges:
                        flags[b] |= ((pos >= start) & (pos < stop)).to(torch.uint8) * T.SPAN
        prev = self.state.input_flags
        if past == 0 or prev is None:
            self.state.input_flags = flags
        else:
            self.state.input_flags = torch.cat([_fit(prev, past, B, flags.dtype, flags.device), flags], dim=1)
        if any(d.flag == T.IMAGE for d in self.compiled.input_detectors):
            image = (self.state.input_flags & T.IMAGE) != 0
            P = image.shape[1]
            last = torch.where(
                image, torch.arange(P, device=image.device), torch.full_like(image, -1, dtype=torch.long)
            )
            self.state.image_end = last.amax(1) + 1
        for hook in self.compiled.forward_hooks:
            hook.on_forward(self, args, kwargs, past)
        return None

    def _layer_hook(self, layer: int):
        plan = self.compiled.layers[layer]

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            B, Tn = hidden.shape[:2]
            found = torch.zeros(B, Tn, dtype=torch.bool, device=hidden.device)
            flags = self.state.input_flags  # (B, P): this forward's tokens are the last Tn
            flags = flags[:, -Tn:] if flags is not None and flags.shape[0] == B and flags.shape[1] >= Tn else None
            for det in plan.layer_detectors:
                if self.state.past > 0 and getattr(det, "prefill_only", False):
                    continue  # detections made at prefill hold for the generated tokens
                found |= det.detect(hidden, flags)
            self.state.pending[layer] = found
            return None

        return hook

    # ------------------------------------------------------------------ mask function
    def _mask(self, *args, **kwargs):
        """transformers mask function: SDPA's boolean mask, with what the attention function needs attached."""
        mask = sdpa_mask(*args, **kwargs)
        if mask is None:
            return None
        pad = kwargs.get("attention_mask")
        B = kwargs.get("batch_size", mask.shape[0])
        if pad is not None and pad.dim() == 2:
            pad = pad.bool()
            has = pad.any(1)
            first = torch.where(has, pad.int().argmax(1), torch.zeros_like(has, dtype=torch.long)).long()
            contiguous = bool((pad.sum(1) == pad.shape[1] - first).all())
        else:
            first = torch.zeros(B, dtype=torch.long, device=mask.device)
            contiguous = True
        q_offset = kwargs.get("q_offset")
        if q_offset is None and kwargs.get("cache_position") is not None:
            q_offset = kwargs["cache_position"][0]
        q_offset = int(q_offset) if q_offset is not None else 0
        plain = (
            kwargs.get("mask_function", causal_mask_function) is causal_mask_function
            and not kwargs.get("use_vmap", False)
            and contiguous
        )
        mask._attnedit = _MaskMeta(first.to(mask.device), q_offset, int(kwargs.get("kv_offset", 0)), plain)
        return mask

    def _mask_info(self, attention_mask, query, key) -> T.MaskInfo:
        B, Q, K = query.shape[0], query.shape[2], key.shape[2]
        if attention_mask is None:
            return T.MaskInfo(None, K - Q, 0, None, torch.zeros(B, dtype=torch.long, device=query.device))
        dense = attention_mask
        if dense.dtype != torch.bool:
            dense = dense > torch.finfo(dense.dtype).min / 2
        dense = dense[:, :, :, :K]
        meta = getattr(attention_mask, "_attnedit", None)
        if meta is None:  # a mask built elsewhere: its first visible key is the row's first token
            first = dense[:, 0].any(1).int().argmax(1).long()
            return T.MaskInfo(dense, K - Q, 0, None, first)
        kv_start = (meta.first_abs - meta.kv_offset).clamp_min(0) if meta.plain_left_pad else None
        return T.MaskInfo(dense, meta.q_offset, meta.kv_offset, kv_start, meta.first_abs)

    # ------------------------------------------------------------------ attention function
    def _attention(self, module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        layer = self._layer_of.get(id(module))
        plan = self.compiled.layers.get(layer) if layer is not None else None
        per_input_scale = self.state.head_scale.get(layer) if layer is not None else None
        if plan is None and per_input_scale is None and (self.capture is None or layer is None):
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
            )
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
        softcap = kwargs.get("softcap")
        mask = self._mask_info(attention_mask, query, key)
        backend = self._backend(query.device)
        share = value if self.capture is None else None  # lets ACT's column scores and attention share one flash pass
        tables = self._tables(layer, plan, query, key, mask, scaling, softcap, backend, per_input_scale, share)
        if self.capture is not None:
            out, weights = reference.attention(
                query,
                key,
                value,
                tables,
                scaling=scaling,
                mask=mask.dense,
                softcap=softcap,
                q_start=mask.q_offset,
                return_weights=True,
            )
            self.capture[layer] = {
                "weights": weights.cpu(),
                "first_key": mask.first_key.cpu(),
                "q_offset": mask.q_offset,
            }
            return out, None
        return dispatch.attention(backend, query, key, value, tables, mask, scaling=scaling, softcap=softcap), None

    def _backend(self, device: torch.device) -> str:
        key = str(device)
        if key not in self._backend_for:
            self._backend_for[key] = choose(self.backend, device)
        return self._backend_for[key]

    def _plan_on(self, plan: T.LayerPlan, device: torch.device) -> T.LayerPlan:
        key = (plan.layer, str(device))
        if key not in self._device_plans:
            mv = tuple(replace(m, keep=m.keep.to(device)) for m in plan.moves)
            to = lambda t: None if t is None else t.to(device)  # noqa: E731
            self._device_plans[key] = replace(
                plan, bias=to(plan.bias), moves=mv, out_scale=to(plan.out_scale), out_shift=to(plan.out_shift)
            )
        return self._device_plans[key]

    def _tables(
        self, layer, plan, query, key, mask: T.MaskInfo, scaling, softcap, backend, per_input_scale, value=None
    ) -> T.LayerTables:
        """This forward's tables for one layer: key groups from the detections, plus the plan."""
        B, H, Q, _ = query.shape
        K = key.shape[2]
        first_key = mask.first_key
        if plan is None:
            scale = per_input_scale.to(query.device, torch.float32) if per_input_scale is not None else None
            return T.LayerTables(None, first_key, 1, None, (), scale, None)
        plan = self._plan_on(plan, query.device)
        prefill = mask.kv_offset == 0 and K == Q
        self._absorb_pending(layer, mask, B, K, prefill)
        flags = self._key_flags(layer, plan, mask, B, H, K, query.device)
        if prefill and plan.attention_detectors:
            pre = self._grouped(plan, flags, first_key, moves=False)
            colsum, count = dispatch.column_scores(
                backend, query, key, pre, mask, scaling=scaling, softcap=softcap, value=value
            )
            found = torch.zeros(B, H, K, dtype=torch.bool, device=query.device)
            for det in plan.attention_detectors:
                found |= det.detect(colsum, count, first_key)
            self.state.head_flags[layer] = found
            flags = flags | (found.to(torch.uint8) * T.ACTSINK)
        tables = self._grouped(plan, flags, first_key, moves=True)
        if per_input_scale is not None:
            base = tables.out_scale if tables.out_scale is not None else torch.ones(H, device=query.device)
            tables = replace(tables, out_scale=base.view(1, H) * per_input_scale.to(query.device, torch.float32))
        return tables

    def _absorb_pending(self, layer, mask: T.MaskInfo, B, K, prefill) -> None:
        found = self.state.pending.pop(layer, None)
        if found is None:
            return
        if prefill:
            self.state.layer_flags[layer] = found
        else:
            prev = _fit(self.state.layer_flags.get(layer), mask.q_offset, B, found.dtype, found.device)
            self.state.layer_flags[layer] = torch.cat([prev, found], dim=1)

    def _key_flags(self, layer, plan: T.LayerPlan, mask: T.MaskInfo, B, H, K, device) -> torch.Tensor:
        """(B, 1|H, K) uint8 flags of the keys, at absolute positions kv_offset .. kv_offset + K."""
        lo, hi = mask.kv_offset, mask.kv_offset + K
        flags = torch.zeros(B, 1, K, dtype=torch.uint8, device=device)
        used = sum(plan.flags)
        if used & T.FIRST:
            keys = torch.arange(K, device=device)
            flags[:, 0] |= (keys[None, :] == mask.first_key.to(device)[:, None]).to(torch.uint8) * T.FIRST
        if used & (T.SPAN | T.IMAGE) and self.state.input_flags is not None:
            flags[:, 0] |= _window(self.state.input_flags, lo, hi, B) & (used & (T.SPAN | T.IMAGE))
        if used & T.HSINK and layer in self.state.layer_flags:
            flags[:, 0] |= _window(self.state.layer_flags[layer].to(torch.uint8), lo, hi, B) * T.HSINK
        if used & T.ACTSINK:
            heads = self.state.head_flags.get(layer)
            flags = flags.expand(B, H, K).clone()
            if heads is not None:
                flags |= _window(heads.to(torch.uint8), lo, hi, B) * T.ACTSINK
        return flags

    def _grouped(self, plan: T.LayerPlan, flags: torch.Tensor, first_key, moves: bool) -> T.LayerTables:
        group = None
        if plan.flags:
            group = torch.zeros_like(flags)
            for k, bit in enumerate(plan.flags):
                group |= ((flags & bit) != 0).to(torch.uint8) << k
        mv = ()
        if moves:
            mv = tuple(
                replace(
                    m,
                    row_start=self.state.image_end if self.state.image_end is not None else torch.zeros_like(first_key),
                )
                if m.after_image
                else m
                for m in plan.moves
            )
        return T.LayerTables(
            key_group=group,
            first_key=first_key,
            n_groups=plan.n_groups,
            bias=plan.bias,
            moves=mv,
            out_scale=plan.out_scale if moves else None,
            out_shift=plan.out_shift if moves else None,
        )


def _fit(prev: torch.Tensor | None, length: int, B: int, dtype, device) -> torch.Tensor:
    """`prev` cut or zero-padded to `length` along dim 1 (state kept from an earlier forward)."""
    if prev is None or prev.shape[0] != B:
        return torch.zeros(B, length, dtype=dtype, device=device)
    if prev.shape[1] >= length:
        return prev[:, :length]
    pad = torch.zeros(B, length - prev.shape[1], *prev.shape[2:], dtype=prev.dtype, device=prev.device)
    return torch.cat([prev, pad], dim=1)


def _window(flags: torch.Tensor, lo: int, hi: int, B: int) -> torch.Tensor:
    """Absolute-position flags (B, [H,] P) sliced to keys lo..hi, zero beyond what was recorded."""
    if flags.shape[0] != B:
        raise AttneditError(
            f"per-input detections were made for a batch of {flags.shape[0]} rows but this forward has {B}; "
            "run a fresh prefill (a forward without a cache) for the new batch"
        )
    P = flags.shape[-1]
    part = flags[..., lo : min(hi, P)]
    if part.shape[-1] < hi - lo:
        pad = torch.zeros(*part.shape[:-1], hi - lo - part.shape[-1], dtype=part.dtype, device=part.device)
        part = torch.cat([part, pad], dim=-1)
    return part


def patch(model: torch.nn.Module, recipe: Recipe | str | Path, backend: str | None = None, spans=None) -> Patch:
    """Prepare a reversible patch of `model` with `recipe`; use it as a context manager or call `.apply()`.

    See `Patch` for the arguments.
    """
    return Patch(model, recipe, backend=backend, spans=spans)
