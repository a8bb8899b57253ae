"""VHR, vision-aware head reinforcement (He et al., ACL 2025): amplify vision-aware heads.

With ``heads: auto`` (the paper's method, the default) the heads are chosen per
input: an extra text-only prefill (the prompt without its image tokens) gives
each head's output ``o_h(text)`` at the last prompt position; during the real
prefill, layer by layer, the vision-aware head divergence
``VHD_h = ||o_h(image + text) - o_h(text)||^2`` at that position picks the heads:
when the layer's VHD spread is large (std > 1), heads whose VHD and whose
text-only output norm are both above mean + std are dropped as outliers, and
the remaining heads above the layer's median VHD are kept. Kept heads'
outputs are multiplied by alpha at every position, prefill and decoding.
Since a layer is chosen after the layers before it were reinforced, the choice
follows the reinforced residual stream, as in the paper's layer-by-layer
select-then-reinforce. Heads are chosen once per input, at the prompt's last
position; the paper's per-step reselection would need a second, text-only
cache during decoding. With a fixed head list the outputs are simply scaled.
Defaults: alpha 2, layer 1 and the last 14 layers.
"""

from __future__ import annotations

import weakref
from typing import Literal, Union

from pydantic import Field

from attnedit.lazy import torch
from attnedit.modelinfo import text_decoder
from attnedit.recipe import HeadSel, InterventionSpec, LayerSel
from attnedit.tables import ForwardHook, Scale

from .heads import o_proj
from .registry import Method, register

# Tokens that frame an image in some chat formats; the text-only prompt drops them too.
_FRAME_KEYS = (
    "vision_start_token_id",
    "vision_end_token_id",
    "boi_token_id",
    "eoi_token_id",
    "image_start_token_id",
    "image_end_token_id",
)


class VhrSpec(InterventionSpec):
    type: Literal["vhr"]
    layers: LayerSel = [1, "-14:"]  # layer 1 and the last 14
    heads: Union[Literal["auto"], HeadSel] = "auto"
    alpha: float = Field(default=2.0, gt=0, le=100, description="multiplier of a selected head's output")

    def targets(self, info) -> dict[int, list[int]]:
        if self.heads == "auto":
            return self.model_copy(update={"heads": "all"}).targets(info)
        return super().targets(info)

    def check_method_model(self, info):
        if not info.is_vlm:
            return [
                (
                    ("type",),
                    f"VHR needs a vision-language model with image tokens; {info.name} ({info.model_type}) "
                    f"has no image token id",
                )
            ]
        return []


def select_heads(vhd: torch.Tensor, text_norm: torch.Tensor) -> torch.Tensor:
    """VHR's choice in one layer: (B, H) divergences and text-only output norms -> (B, H) bool.

    Outliers (only when the layer's VHD std exceeds 1): VHD and text-only norm both above
    their mean + std. The rest: kept if their VHD is above the median of the non-outliers.
    """
    vhd, text_norm = vhd.float(), text_norm.float()
    std = vhd.std(1, keepdim=True)
    outlier = (std > 1) & (vhd > vhd.mean(1, keepdim=True) + std)
    outlier &= text_norm > text_norm.mean(1, keepdim=True) + text_norm.std(1, keepdim=True)
    median = torch.where(outlier, torch.full_like(vhd, float("nan")), vhd).nanmedian(1, keepdim=True).values
    return ~outlier & (vhd > median)


def _last_real(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B,) index of each row's last real token."""
    T = mask.shape[1]
    return (mask.long() * torch.arange(1, T + 1, device=mask.device)).argmax(1)


class VisionAwareHeads:
    """The online head choice: a forward hook of the patch (see `Patch`), plus o_proj pre-hooks."""

    def __init__(
        self, targets: dict[int, list[int]], alpha: float, image_token_id: int, drop_ids: tuple[int, ...], head_dim: int
    ):
        self.targets, self.alpha, self.D = targets, alpha, head_dim
        self.image_token_id, self.drop_ids = image_token_id, drop_ids
        self.mode: str | None = None  # "text" while the text-only prefill runs, "select" during a prefill with an image
        self.text: dict[int, torch.Tensor] = {}  # layer -> (B, H, D) text-only outputs at the last prompt position
        self.last: torch.Tensor | None = None
        self.chosen: dict[int, torch.Tensor] = {}  # layer -> (B, H) bool on the layer's device, the last input's choice
        self._patch = None
        self._handles: list = []
        self.last_target = max(targets, default=-1)

    def on_forward(self, patch, args, kwargs, past: int) -> None:
        if self.mode == "text":
            return  # the text-only prefill itself
        self.mode = None
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        if past > 0 or ids is None or not bool((ids == self.image_token_id).any()):
            return  # decoding keeps the prefill's choice (patch.state.head_scale); no image: nothing to reinforce
        self._install(patch)
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask
        self.text, self.chosen = {}, {}
        self._text_prefill(patch, ids, mask)
        self.last = _last_real(mask)
        self.mode = "select"

    def _install(self, patch) -> None:
        """o_proj pre-hooks, registered with the patch's own hooks so that `Patch.remove` takes them off."""
        if self._patch is not None and self._patch() is patch and self._handles and self._handles[0] in patch._hooks:
            return
        self._patch = weakref.ref(patch)
        self._handles = [
            o_proj(patch.model, layer).register_forward_pre_hook(self._hook(patch, layer)) for layer in self.targets
        ]
        patch._hooks.extend(self._handles)

    def _text_prefill(self, patch, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Run the prompt without its image tokens (left-padded), recording o_h at the last position."""
        drop = torch.isin(ids, torch.tensor((self.image_token_id, *self.drop_ids), device=ids.device)) | (mask == 0)
        rows = [ids[b][~drop[b]] for b in range(ids.shape[0])]
        T = max(1, max(len(r) for r in rows))
        text = torch.zeros(len(rows), T, dtype=ids.dtype, device=ids.device)
        tmask = torch.zeros_like(text)
        for b, r in enumerate(rows):
            text[b, T - len(r) :], tmask[b, T - len(r) :] = r, 1
        saved, patch.state = patch.state, type(patch.state)()  # keep the real input's detections apart
        self.mode, self.last = "text", _last_real(tmask)
        try:
            with torch.no_grad():
                text_decoder(patch.model)(
                    input_ids=text,
                    attention_mask=tmask,
                    position_ids=(tmask.cumsum(1) - 1).clamp_min(0),
                    use_cache=False,
                )
        finally:
            patch.state, self.mode = saved, None

    def _hook(self, patch, layer: int):
        heads = torch.tensor(self.targets[layer])
        on_device: dict = {}  # device -> the heads there (copied once: a copy to a GPU waits for it)

        def hook(module, args):
            if self.mode is None:
                return None
            x = args[0]  # (B, T, H*D): every head's output before o_proj
            B, T = x.shape[:2]
            o = x.view(B, T, -1, self.D)[torch.arange(B, device=x.device), self.last.to(x.device)].float()  # (B, H, D)
            if self.mode == "text":
                self.text[layer] = o
                return None
            ref = self.text[layer].to(o.device)
            chosen = torch.zeros(B, o.shape[1], dtype=torch.bool, device=x.device)
            h = on_device.get(x.device)
            if h is None:
                h = on_device[x.device] = heads.to(x.device)
            chosen[:, h] = select_heads((o[:, h] - ref[:, h]).pow(2).sum(-1), ref[:, h].norm(dim=-1))
            scale = torch.where(
                chosen,
                torch.full_like(chosen, self.alpha, dtype=torch.float32),
                torch.ones_like(chosen, dtype=torch.float32),
            )
            self.chosen[layer] = chosen  # kept on the device: reading it back would wait for the GPU per layer
            patch.state.head_scale[layer] = scale  # the decoding steps apply it in the attention
            if layer == self.last_target:  # the choice is made: decoding steps find mode None from their first
                self.mode = None  # (a compiled step guards on it: one graph, not one for the first step)
            return (x * scale.to(x.dtype).repeat_interleave(self.D, dim=1).view(B, 1, -1),)

        return hook


def compile(spec: VhrSpec, info, model=None) -> list:
    if spec.heads != "auto":
        return [Scale(layer, tuple(heads), spec.alpha) for layer, heads in spec.targets(info).items()]
    config = getattr(model, "config", None)
    drop = tuple(v for k in _FRAME_KEYS if isinstance(v := getattr(config, k, None), int))
    return [ForwardHook(VisionAwareHeads(spec.targets(info), spec.alpha, info.image_token_id, drop, info.head_dim))]


METHOD = register(
    Method(
        name="vhr",
        schema=VhrSpec,
        compile=compile,
        summary="VHR: multiply the outputs of vision-aware heads (chosen per input by VHD) by alpha",
        emits=(Scale, ForwardHook),
        per_input=True,  # with heads: auto, the heads are chosen from each input at prefill
        fold="fixed heads: o_proj columns (heads: auto chooses per input and stays dynamic)",
    )
)
