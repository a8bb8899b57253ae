"""VAR, visual attention redistribution (Kang et al., ICLR 2025).

Per input, at each selected layer: tokens whose RMS-normalised layer-input
hidden state is above tau on the model's massive-activation ("sink")
dimensions are sinks. In an image-centric row (visual sinks hold at most rho
of the row's image attention, and the image holds at least `min_image_mass`),
every sink keeps p of its attention and the freed mass goes to the visual
non-sink tokens in proportion. Only rows after the image are edited.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Union

import torch
from pydantic import Field

from attnedit.errors import UnsupportedModelError
from attnedit.modelinfo import decoder_layers, text_decoder
from attnedit.recipe import InterventionSpec, LayerSel
from attnedit.tables import HSINK, IMAGE, Detect, Gate, KeySet, MoveEffect

from .registry import register


class VarSpec(InterventionSpec):
    type: Literal["var"]
    layers: LayerSel = ":-1"  # all layers but the last
    tau: float = Field(default=20.0, gt=0, description="threshold on |h / rms(h)| in a sink dimension")
    rho: float = Field(default=0.5, ge=0, le=1, description="a row is image-centric if visual sinks hold at most rho of its image attention")
    p: float = Field(default=0.6, ge=0, le=1, description="fraction of a sink's attention that is kept")
    min_image_mass: float = Field(default=0.2, ge=0, le=1, description="a row is edited only if the image holds at least this mass")
    sink_dims: Union[Literal["auto"], list[int]] = Field(default="auto", description="massive-activation dimensions, or 'auto' to find them")

    SUMMARY: ClassVar[str] = "VAR: move attention from sink tokens to the image's non-sink tokens in image-centric rows"

    def check_method_model(self, info):
        problems = []
        if not info.is_vlm:
            problems.append((("type",), f"VAR needs a vision-language model with image tokens; {info.name} ({info.model_type}) has no image token id"))
        if isinstance(self.sink_dims, list):
            bad = [d for d in self.sink_dims if not 0 <= d < info.hidden_size]
            if bad:
                problems.append((("sink_dims",), f"dimensions {bad} do not exist: hidden size is {info.hidden_size}"))
        return problems


@dataclass(frozen=True, eq=False)
class ImageTokens:
    """Image placeholder tokens, from the input ids."""

    image_token_id: int
    flag: int = IMAGE
    where: str = "input"

    def detect(self, input_ids: torch.Tensor) -> torch.Tensor:
        return input_ids == self.image_token_id

    def __eq__(self, other):
        return isinstance(other, ImageTokens) and other.image_token_id == self.image_token_id

    __hash__ = object.__hash__


@dataclass(frozen=True, eq=False)
class HiddenSinks:
    """Tokens whose RMS-normalised hidden state exceeds tau on a sink dimension."""

    dims: tuple[int, ...]
    tau: float
    flag: int = HSINK
    where: str = "layer_input"

    def detect(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, T) bool."""
        if not self.dims:
            return torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        h = hidden.float()
        x = h.abs() / h.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
        return x[..., list(self.dims)].amax(-1) > self.tau

    def merge(self, other: "HiddenSinks") -> "HiddenSinks":
        return other


def find_sink_dims(model: torch.nn.Module, info, tau: float, max_dims: int = 4) -> tuple[int, ...]:
    """Find the massive-activation dimensions of a model.

    Runs a short text through the decoder and reads the layer-input hidden
    states of the first token, where the usual sink sits. A dimension is a
    sink dimension when its normalised magnitude exceeds `tau` at that token in
    some layer >= 2; the `max_dims` largest are kept. A model without massive
    activations (a random one) has none, and VAR then edits nothing.
    """
    layers = decoder_layers(model)
    seen: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden[:, 0].detach().float())

    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in list(layers)[2:]]
    try:
        ids = _probe_ids(model)
        with torch.no_grad():
            text_decoder(model)(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        return ()
    h = torch.cat(seen)  # (n_layers - 2, D) first-token states
    x = h.abs() / h.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
    peak = x.amax(0)
    order = torch.argsort(peak, descending=True)
    return tuple(int(d) for d in order[:max_dims] if peak[d] > tau)


def _probe_ids(model) -> torch.Tensor:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = config.vocab_size
    bos = getattr(config, "bos_token_id", None)
    bos = bos if isinstance(bos, int) and 0 <= bos < vocab else 1
    gen = torch.Generator().manual_seed(0)
    body = torch.randint(3, vocab, (15,), generator=gen)
    device = next(model.parameters()).device
    return torch.cat([torch.tensor([bos]), body]).view(1, -1).to(device)



@register("var", schema=VarSpec, summary=VarSpec.SUMMARY)
def compile(spec: VarSpec, info, model=None) -> list:
    if spec.sink_dims == "auto":
        if model is None:
            raise UnsupportedModelError("VAR with sink_dims: auto needs the loaded model to find its sink dimensions")
        dims = find_sink_dims(model, info, spec.tau)
    else:
        dims = tuple(spec.sink_dims)
    out: list = [Detect(None, ImageTokens(info.image_token_id))]
    sinks = HiddenSinks(dims, spec.tau)
    gate = Gate(num=KeySet(on=IMAGE | HSINK), den=KeySet(on=IMAGE), max_ratio=spec.rho, min_den=spec.min_image_mass)
    for layer, heads in spec.targets(info).items():
        out.append(Detect(layer, sinks))
        out.append(
            MoveEffect(layer, tuple(heads), KeySet(on=HSINK), KeySet(on=IMAGE, off=HSINK), spec.p, gate=gate, after_image=True)
        )
    return out
