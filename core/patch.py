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
from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask

from attnedit.kernels import BACKENDS, choose, dispatch, reference
from attnedit.kernels.device import capturing

from . import runtime as R
from . import tables as T
from .errors import AttneditError, BackendError
from .modelinfo import ModelInfo, decoder_layers, text_decoder
from .recipe import Recipe

log = logging.getLogger("attnedit")
_COUNTER = itertools.count()
_ACTIVE: "weakref.WeakKeyDictionary[torch.nn.Module, Patch]" = weakref.WeakKeyDictionary()


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
        self.state = R.State()
        self.spans: list[list[tuple[int, int]]] | None = None
        self._spans_at: dict[str, torch.Tensor] = {}
        self._fwd: R.Forward | None = None
        self._inner_pending = False
        self.capture: dict[int, dict[str, torch.Tensor]] | None = None  # set to {} to record maps (inspect)
        self._hooks: list[Any] = []
        self._saved: Any = None
        self._layer_of: dict[int, int] = {}
        self._device_plans: dict[tuple[int, str], T.LayerPlan] = {}
        self._backend_for: dict[torch.device, str] = {}
        self._longest: tuple | None = None  # (weak reference to a cache, its layer count, longest layer)
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
            inner = text_decoder(self.model)
            if inner is not self.model:  # a direct call of the text decoder (no model pre-hook) gets its own forward
                self._hooks.append(inner.register_forward_pre_hook(self._on_inner_forward, with_kwargs=True))
            for i, layer in enumerate(layers):
                plan = self.compiled.layers.get(i)
                if plan is not None and plan.layer_detectors:
                    self._hooks.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        except BaseException:
            self._restore(saved, text_cfg)
            raise
        self._saved = (saved, text_cfg)
        _ACTIVE[self.model] = self
        for device in {p.device for p in self.model.parameters()}:
            dispatch.prepare(self.backend, device)  # eagerly: not inside a compiled step's CUDA graphs
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
        """Forget per-input detections and their buffers (a prefill overwrites them anyway)."""
        self.state = R.State()
        self._fwd = None

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
        self._spans_at = {}
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

    def _spans_on(self, device: torch.device) -> torch.Tensor | None:
        """The spans as a (B, S, 2) int64 tensor on `device` (rows padded with empty ranges), made once per device."""
        if self.spans is None:
            return None
        key = str(device)
        if key not in self._spans_at:
            S = max(1, max((len(r) for r in self.spans), default=0))
            t = torch.zeros(len(self.spans), S, 2, dtype=torch.long)
            for b, ranges in enumerate(self.spans):
                for s, (start, stop) in enumerate(ranges):
                    t[b, s, 0], t[b, s, 1] = start, stop
            self._spans_at[key] = t.to(device)
        return self._spans_at[key]

    def _on_model_forward(self, module, args, kwargs):
        """Model pre-hook: this forward's shared per-input work (positions, flags, first real tokens), once."""
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        self._begin(ids, kwargs, args)
        self._inner_pending = self._fwd is not None
        return None

    def _on_inner_forward(self, module, args, kwargs):
        """Text-decoder pre-hook: a forward of its own only when the model pre-hook did not run for this call."""
        if self._inner_pending:
            self._inner_pending = False
            return None
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        self._begin(ids, kwargs, args)
        return None

    def _begin(self, ids, kwargs, args) -> None:
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            return
        B, Tn = ref.shape[:2]
        past, capacity = self._cache_extent(kwargs.get("cache", kwargs.get("past_key_values")), Tn)
        detect = past == 0 if isinstance(past, int) else Tn > 1
        if detect and not torch.compiler.is_compiling():
            # resolved at the (eager) prefill: a compiled step that filled the map would be guarded on it and
            # compiled again at the next step (VHR's layers meet the backend only when decoding)
            try:
                self._backend(ref.device)
            except BackendError:
                pass  # raised where a layer needs the backend, as before
        if self.compiled.input_detectors and ids is None:
            det = self.compiled.input_detectors[0]
            raise AttneditError(f"{type(det).__name__} needs input_ids; this forward received only inputs_embeds")
        if self.compiled.needs_spans:
            if self.spans is None and detect and not torch.compiler.is_compiling():
                log.warning("the recipe highlights spans (PASTA) but no spans were given: every key gets the bias")
            if self.spans is not None and len(self.spans) != B:
                raise AttneditError(f"spans were given for {len(self.spans)} rows but the batch has {B}")
        if self.compiled.forward_hooks and detect and (torch.compiler.is_compiling() or capturing(ref)):
            names = ", ".join(sorted({type(h).__name__ for h in self.compiled.forward_hooks}))
            raise AttneditError(
                f"the recipe chooses per input at the prefill ({names}: a forward of its own, read on the host), "
                "which torch.compile and CUDA graphs cannot record; run the prefill eagerly and compile or capture "
                "the decoding steps only (generate(cache_implementation='static') does)"
            )
        # forward hooks first: they may run forwards of their own (VHR's text-only prefill)
        hook_past = past if isinstance(past, int) else (0 if detect else 1)
        if self.compiled.forward_hooks:
            hook_kwargs = kwargs
            pad = kwargs.get("attention_mask")
            if detect and pad is not None and not (torch.is_tensor(pad) and pad.dim() == 2):
                # hooks see a (B, T) padding mask, also where generate hands the model dense masks (a static cache)
                hook_kwargs = dict(kwargs, attention_mask=R.padding_of(pad, Tn).to(ref.device).long())
            for hook in self.compiled.forward_hooks:
                hook.on_forward(self, args, hook_kwargs, hook_past)
        self._fwd = R.begin(
            self.state,
            self.compiled,
            batch=B,
            length=Tn,
            device=ref.device,
            past=past,
            capacity=capacity,
            detect=detect,
            attention_mask=kwargs.get("attention_mask"),
            input_ids=ids,
            spans=self._spans_on(ref.device) if self.compiled.needs_spans else None,
        )

    def _forward_for(self, query: torch.Tensor, key: torch.Tensor) -> R.Forward:
        """This forward's shared state; one made from the shapes when no pre-hook ran (a bare attention call)."""
        fwd = self._fwd
        B, Q, K = query.shape[0], query.shape[2], key.shape[2]
        if fwd is None or fwd.batch != B or fwd.length != Q:
            fwd = R.begin(
                self.state,
                self.compiled,
                batch=B,
                length=Q,
                device=query.device,
                past=K - Q,
                capacity=K,
                detect=K == Q,
                attention_mask=None,
                input_ids=None,
                spans=None,
            )
            self._fwd = fwd
        return fwd

    def _layer_hook(self, layer: int):
        plan = self.compiled.layers[layer]
        # detectors that all run at prefill only leave a later forward nothing to do: the prefill
        # cleared the positions it did not flag (`record_layer_detection`)
        prefill_only = not plan.detects_after_prefill

        def hook(module, args, kwargs):
            fwd = self._fwd
            if fwd is not None and not fwd.detect and prefill_only:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            B, Tn = hidden.shape[:2]
            if fwd is None or fwd.batch != B or fwd.length != Tn:
                return None
            view = fwd.on(hidden.device)
            flags = view.flags.index_select(1, view.positions) if view.flags is not None else None
            found = torch.zeros(B, Tn, dtype=torch.bool, device=hidden.device)
            for det in plan.layer_detectors:
                if not fwd.detect and getattr(det, "prefill_only", False):
                    continue  # detections made at prefill hold for the generated tokens
                found |= det.detect(hidden, flags)
            R.record_layer_detection(fwd, layer, found)
            return None

        return hook

    # ------------------------------------------------------------------ mask function
    def _mask(self, *args, **kwargs):
        """transformers mask function: SDPA's boolean mask; records the key offset this mask size has.

        The mask is materialised whenever the keys reach past the last query: a static cache's
        decoding steps (their query offset is a device tensor) and its prefill (keys up to the
        cache's full length). transformers leaves such a prefill's mask out because SDPA's
        `is_causal` aligns queries with the first keys; the patch's kernels align a missing mask
        with the last keys, as a dynamic cache has them.
        """
        q_offset, q_length, kv_length = kwargs.get("q_offset"), kwargs.get("q_length"), kwargs.get("kv_length")
        if torch.is_tensor(q_offset) or (
            isinstance(q_length, int) and isinstance(kv_length, int) and kv_length != (q_offset or 0) + q_length
        ):
            kwargs["allow_is_causal_skip"] = False
        mask = sdpa_mask(*args, **kwargs)
        fwd = self._fwd
        kv_length = kwargs.get("kv_length")
        if fwd is not None and isinstance(kv_length, int):
            fwd.kv_offsets[kv_length] = int(kwargs.get("kv_offset", 0))
            plain = kwargs.get("mask_function", causal_mask_function) is causal_mask_function and not kwargs.get(
                "use_vmap", False
            )
            fwd.causal[kv_length] = plain
        return mask

    def _mask_info(self, fwd: R.Forward, view: R.View, attention_mask, query, key, backend: str) -> T.MaskInfo:
        Q, K = query.shape[2], key.shape[2]
        if attention_mask is None:  # the same for every layer of this forward with these shapes on this view
            hit = fwd.cache.get(("mask", Q, K, id(view)))
            if hit is None:
                hit = fwd.cache[("mask", Q, K, id(view))] = T.MaskInfo(
                    None, view.pos0, fwd.kv_offset(Q, K), None, view.first_abs
                )
            return hit
        kv_offset = fwd.kv_offset(Q, K)
        dense = attention_mask
        if dense.dtype != torch.bool:
            dense = dense > torch.finfo(dense.dtype).min / 2
        dense = dense[:, :, :, :K]
        first_abs = view.first_abs
        kv_start = None
        if backend == "triton" and Q > 1 and fwd.causal.get(K, False) and fwd.padding_is_left(view):
            kv_start = (first_abs - kv_offset).clamp_min(0)
        return T.MaskInfo(dense, view.pos0, kv_offset, kv_start, first_abs)

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
        device = query.device
        backend = self._backend(device)
        fwd = self._forward_for(query, key)
        view = fwd.on(device)
        mask = self._mask_info(fwd, view, attention_mask, query, key, backend)
        share = value if self.capture is None else None  # lets ACT's column scores and attention share one flash pass
        if plan is not None:
            plan = R.plan_on(self._device_plans, plan, device)
        detect = None
        if fwd.detect and plan is not None and plan.attention_detectors:

            def detect(pre: T.LayerTables) -> torch.Tensor:
                colsum, count = dispatch.column_scores(
                    backend, query, key, pre, mask, scaling=scaling, softcap=softcap, value=share
                )
                found = torch.zeros(colsum.shape, dtype=torch.bool, device=device)
                for det in plan.attention_detectors:
                    found |= det.detect(colsum, count, pre.first_key)
                return found

        tables = R.layer_tables(
            plan,
            fwd,
            layer,
            device=device,
            heads=query.shape[1],
            k_len=key.shape[2],
            kv_offset=mask.kv_offset,
            head_scale=per_input_scale,
            detect_sinks=detect,
        )
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
                "q_offset": int(mask.q_offset),
            }
            return out, None
        if query.shape[2] == 1:  # a decoding step: the backend keeps its set-up per layer until the next input
            out = dispatch.decode_step(
                backend,
                self.state.decode_plans,
                layer,
                query,
                key,
                value,
                tables,
                mask,
                scaling=scaling,
                softcap=softcap,
            )
            return out, None
        return dispatch.attention(backend, query, key, value, tables, mask, scaling=scaling, softcap=softcap), None

    def _cache_extent(self, cache, length: int) -> tuple[int | torch.Tensor, int]:
        """(tokens already in the cache, positions the per-input buffers must hold) for a forward of `length` tokens.

        A dynamic cache knows its length as a Python int; a static cache keeps it on the device (a tensor
        that it advances in place) and holds `max_cache_len` positions. Its layers' longest
        `max_cache_len` (fixed when a layer is made) is kept for the cache object and its number of
        layers, so a decoding step does not walk every layer.
        """
        if cache is None or not hasattr(cache, "get_seq_length"):
            return 0, length
        past = cache.get_seq_length()
        n_layers = len(getattr(cache, "layers", ()))
        kept = self._longest
        if kept is not None and kept[0]() is cache and kept[1] == n_layers:
            longest = kept[2]
        else:
            longest = _longest_layer(cache)
            try:
                self._longest = (weakref.ref(cache), n_layers, longest)
            except TypeError:  # a cache object that takes no weak reference: walked at every forward
                self._longest = None
        if torch.is_tensor(past):
            return past, max(longest, length)
        return int(past), max(int(past) + length, longest)

    def _backend(self, device: torch.device) -> str:
        hit = self._backend_for.get(device)
        if hit is None:
            hit = self._backend_for[device] = choose(self.backend, device)
            dispatch.prepare(hit, device)
        return hit


def _longest_layer(cache) -> int:
    """The most positions any layer of `cache` holds (a static cache's `max_cache_len`; 0 for dynamic layers)."""
    longest = 0
    for layer in getattr(cache, "layers", ()):
        longest = max(longest, getattr(layer, "max_cache_len", 0) or 0)
    return longest


def patch(model: torch.nn.Module, recipe: Recipe | str | Path, backend: str | None = None, spans=None) -> Patch:
    """Prepare a reversible patch of `model` with `recipe`; use it as a context manager or call `.apply()`.

    See `Patch` for the arguments.
    """
    return Patch(model, recipe, backend=backend, spans=spans)
