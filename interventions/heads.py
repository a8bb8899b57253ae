"""Reading attention heads' outputs: the input of each layer's output projection, (B, T, H, D).

Shared by head pruning (mean ablation, PH3 scores) and VHR (per-input head choice).
"""

from __future__ import annotations

from attnedit.errors import AttneditError, UnsupportedModelError
from attnedit.lazy import no_grad, torch
from attnedit.modelinfo import decoder_layers


def o_proj(model, layer: int) -> torch.nn.Linear:
    """The output projection of a decoder layer's attention: its input holds every head's output."""
    attn = decoder_layers(model)[layer].self_attn
    proj = getattr(attn, "o_proj", None)
    if not isinstance(proj, torch.nn.Linear):
        raise UnsupportedModelError(f"{type(attn).__name__} has no o_proj linear layer to read head outputs from")
    return proj


class HeadOutputs:
    """Context manager recording each layer's head outputs (the input of o_proj) on every forward.

    `self.out[layer]` is the list of (B, T, H, D) fp32 tensors seen, in order.
    """

    def __init__(self, model, layers, head_dim: int):
        self.model, self.layers, self.D = model, list(layers), head_dim
        self.out: dict[int, list[torch.Tensor]] = {l: [] for l in self.layers}
        self._handles = []

    def __enter__(self):
        for l in self.layers:

            def grab(module, args, layer=l):
                x = args[0]
                self.out[layer].append(x.detach().float().view(*x.shape[:2], -1, self.D))

            self._handles.append(o_proj(self.model, l).register_forward_pre_hook(grab))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()


def left_padded(tokenizer, texts: list[str], batch_size: int, device):
    """Left-padded batches of `texts` (the tokenizer's padding side is restored afterwards)."""
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    side, tok.padding_side = tok.padding_side, "left"
    try:
        for i in range(0, len(texts), batch_size):
            yield tok(texts[i : i + batch_size], return_tensors="pt", padding=True).to(device)
    finally:
        tok.padding_side = side


@no_grad
def head_means(
    model, tokenizer, texts: list[str], targets: dict[int, list[int]], head_dim: int, batch_size: int = 8
) -> dict[int, dict[int, list[float]]]:
    """Mean output of each target head over every real token of a reference set.

    Args:
        model, tokenizer: the loaded model and its tokenizer.
        texts: the reference prompts.
        targets: {layer: [heads]}.
        head_dim: the model's head dimension.
    Returns:
        {layer: {head: [head_dim floats]}}, the `means` field of a mean-ablation spec.
    """
    if not texts:
        raise AttneditError("mean ablation needs a non-empty reference set")
    device = next(model.parameters()).device
    sums: dict[int, torch.Tensor] = {}
    count = 0
    with HeadOutputs(model, targets, head_dim) as rec:
        for enc in left_padded(tokenizer, texts, batch_size, device):
            model(**enc, use_cache=False)
            real = enc["attention_mask"].bool().cpu()  # (B, T)
            count += int(real.sum())
            for l in targets:
                part = rec.out[l].pop().cpu()[real].sum(0)  # (H, D) over real tokens
                sums[l] = sums[l] + part if l in sums else part
    return {l: {h: [float(v) for v in sums[l][h] / count] for h in hs} for l, hs in targets.items()}
