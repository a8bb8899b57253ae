"""Rescore candidates that edit only later layers without recomputing the earlier ones.

A head search (ACT: one candidate head at a time) runs the same prompts once per
candidate, and a candidate at layer l leaves layers 0..l-1 as they were. `Replay`
runs the unpatched model once, keeps what enters every decoder layer (hidden
states and the layer's keyword arguments: mask, rotary embeddings, positions),
and for a candidate runs only layers l..L-1 under the patch, then the final norm
and the output embedding at the last position. On average this halves the
search. It serves prompts whose answers are single tokens (the last position's
logits), the case of classification tasks with one-token labels; `Replay.fits`
says whether it applies and whether the cache fits its memory budget.
"""

from __future__ import annotations

from typing import Sequence

from attnedit.lazy import no_grad, torch
from attnedit.modelinfo import decoder_layers, text_decoder


class Replay:
    """Cached layer inputs of fixed left-padded batches.

    Args:
        model: the loaded (unpatched) causal LM.
        batches: (input_ids (B, T), attention_mask (B, T)) pairs.
    """

    def __init__(self, model, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        self.model = model
        self.layers = list(decoder_layers(model))
        self.inputs: list[list[tuple[torch.Tensor, dict]]] = []  # per batch, per layer: (hidden, kwargs)
        for ids, mask in batches:
            seen: list[tuple[torch.Tensor, dict]] = []

            def grab(module, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                seen.append((hidden.detach(), rest))

            handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in self.layers]
            try:
                with torch.no_grad():
                    model(
                        input_ids=ids,
                        attention_mask=mask,
                        position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                        use_cache=False,
                        logits_to_keep=1,
                    )
            finally:
                for h in handles:
                    h.remove()
            self.inputs.append(seen)

    @staticmethod
    def fits(model, n_tokens: int, budget_bytes: int | None = None) -> bool:
        """Whether caching every layer's input for `n_tokens` tokens stays within `budget_bytes`.

        Default budget: a quarter of the free memory of the model's CUDA device, 2 GiB elsewhere.
        """
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        param = next(model.parameters())
        if budget_bytes is None:
            budget_bytes = 2 << 30
            if param.device.type == "cuda":
                budget_bytes = max(budget_bytes, torch.cuda.mem_get_info(param.device)[0] // 4)
        per_token = config.num_hidden_layers * config.hidden_size * param.element_size()
        return n_tokens * per_token <= budget_bytes

    @no_grad
    def last_logits(self, start: int, patch=None) -> list[torch.Tensor]:
        """(B, V) fp32 logits at the last position of each batch, recomputing layers start..L-1.

        Args:
            start: the first layer that the candidate edits.
            patch: the applied `Patch` of the candidate (its per-input state is reset per batch).
        """
        decoder = text_decoder(self.model)
        out = []
        for seen in self.inputs:
            if patch is not None:
                patch.reset()
            hidden = seen[start][0]
            for layer, (_, kwargs) in zip(self.layers[start:], seen[start:]):
                res = layer(hidden, **kwargs)
                hidden = res[0] if isinstance(res, tuple) else res
            last = decoder.norm(hidden[:, -1:])
            out.append(self.model.get_output_embeddings()(last)[:, -1].float())
        return out


def first_layer(compiled) -> int | None:
    """The first layer a compiled recipe touches, or None when it needs the whole forward (input detectors, hooks)."""
    if compiled.input_detectors or compiled.forward_hooks or not compiled.layers:
        return None
    return min(compiled.layers)
