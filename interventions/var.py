"""VAR, visual attention redistribution (Kang et al., ICLR 2025).

Per input, at prefill, at each selected layer: tokens whose RMS-normalised
layer-input hidden state ``|h / rms(h)|`` exceeds tau on one of the model's
massive-activation ("sink") dimensions are sinks; the sinks found at prefill
hold for the generated tokens (the authors detect them only at prefill). A
row is image-centric when the image holds at least `min_image_mass` of its
attention and the visual sinks at most rho of that; in such a row every sink
(text or visual) keeps p of its attention and the freed mass goes to the
image's non-sink tokens in proportion. Rows of the prompt up to the last image
token are never edited, and an input whose image has no sink at a layer is
left alone there (as in the authors' code). Defaults follow the authors'
code: layers 2 .. L-2 (sinks are searched from layer 2 on; the last layer is
skipped), tau 20, rho 0.5, p 0.6, mass floor 0.2. The sink dimensions, which
the authors hard-code per model, are found by `find_sink_dims`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Literal, Union

from pydantic import Field

from attnedit.errors import UnsupportedModelError
from attnedit.lazy import torch
from attnedit.modelinfo import decoder_layers, text_decoder
from attnedit.recipe import InterventionSpec, LayerSel
from attnedit.tables import HSINK, IMAGE, Detect, Gate, KeySet, MoveEffect

from .calibration import Calibration, Found
from .registry import Method, Search, register

_FOUND: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


class VarSpec(InterventionSpec):
    type: Literal["var"]
    layers: LayerSel = "2:-1"  # layers 2 .. L-2
    tau: float = Field(default=20.0, gt=0, description="threshold on |h / rms(h)| in a sink dimension")
    rho: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="a row is image-centric if visual sinks hold at most rho of its image attention",
    )
    p: float = Field(default=0.6, ge=0, le=1, description="fraction of a sink's attention that is kept")
    min_image_mass: float = Field(
        default=0.2, ge=0, le=1, description="a row is edited only if the image holds at least this mass"
    )
    sink_dims: Union[Literal["auto"], list[int]] = Field(
        default="auto", description="massive-activation dimensions, or 'auto' to find them"
    )

    def check_method_model(self, info):
        problems = []
        if not info.is_vlm:
            problems.append(
                (
                    ("type",),
                    f"VAR needs a vision-language model with image tokens; {info.name} ({info.model_type}) "
                    f"has no image token id",
                )
            )
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


def _inv_rms(hidden: torch.Tensor) -> torch.Tensor:
    """1 / rms(h) in fp32, (..., 1): the norm reads the states once, in their own dtype (no fp32 copy)."""
    norm = torch.linalg.vector_norm(hidden, dim=-1, keepdim=True, dtype=torch.float32)
    return torch.rsqrt(norm.square() / hidden.shape[-1] + 1e-6)


def normalised(hidden: torch.Tensor) -> torch.Tensor:
    """|h / rms(h)| in fp32 (RMS norm without its weight), (..., D)."""
    return hidden.float().abs() * _inv_rms(hidden)


def normalised_at(hidden: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """`normalised(hidden)[..., dims]`, (..., len(dims)), the same arithmetic on the chosen dimensions only.

    The dimensions are taken one by one as views: an index list would be copied to the GPU at every
    layer, and such a copy waits for the device.
    """
    return torch.stack([hidden[..., d] for d in dims], -1).float().abs() * _inv_rms(hidden)


@dataclass(frozen=True, eq=False)
class HiddenSinks:
    """Tokens whose normalised hidden state exceeds tau on a sink dimension, at prefill.

    A row whose image tokens hold no sink gets none at all: the authors edit a
    layer only when it has visual sinks, and without sinks nothing moves.
    """

    dims: tuple[int, ...]
    tau: float
    flag: int = HSINK
    where: str = "layer_input"
    prefill_only: bool = True

    def detect(self, hidden: torch.Tensor, flags: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, D) hidden, (B, T) uint8 input flags -> (B, T) bool sinks."""
        if not self.dims or flags is None:
            return torch.zeros(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        sink = normalised_at(hidden, self.dims).amax(-1) > self.tau
        visual = sink & ((flags & IMAGE) != 0)
        return sink & visual.any(1, keepdim=True)

    def merge(self, other: "HiddenSinks") -> "HiddenSinks":
        return other


# --------------------------------------------------------------------------- sink dimensions


def find_sink_dims(
    model: torch.nn.Module,
    tau: float = 20.0,
    max_dims: int = 4,
    min_share: float = 0.5,
    probe: torch.Tensor | None = None,
) -> tuple[int, ...]:
    """Find a model's massive-activation ("sink") dimensions from its hidden states.

    Runs a probe through the text decoder and reads the RMS-normalised inputs of
    layers 2 .. L-1. A dimension is a sink dimension when, at the first token
    (where the usual sink sits), it exceeds `tau` in at least `min_share` of
    those layers, while the median token stays below `tau` in it (a dimension
    that is large everywhere marks no sink). At most `max_dims` are kept, the
    most consistent first. A model without massive activations has none.

    Args:
        model: a loaded causal LM or vision-language model.
        tau: VAR's threshold.
        max_dims: the most dimensions to return.
        min_share: share of layers in which the first token must pass `tau`.
        probe: (B, T) input ids; default: 4 fixed random sequences of 32 tokens.
    Returns:
        Sorted dimension indices.
    """
    layers = list(decoder_layers(model))[2:]
    seen: list[torch.Tensor] = []

    def grab(module, args, kwargs):
        seen.append(normalised((args[0] if args else kwargs["hidden_states"]).detach()))

    ids = _probe_ids(model) if probe is None else probe
    handles = [layer.register_forward_pre_hook(grab, with_kwargs=True) for layer in layers]
    try:
        with torch.no_grad():
            text_decoder(model)(input_ids=ids.to(next(model.parameters()).device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if not seen:
        return ()
    x = torch.stack(seen)  # (L', B, T, D)
    first = x[:, :, 0]  # (L', B, D)
    share = (first > tau).float().mean((0, 1))  # (D,)
    typical = x[:, :, 1:].flatten(0, 2).median(0).values if x.shape[2] > 1 else torch.zeros_like(share)
    ok = (share >= min_share) & (typical < tau)
    strength = first.mean((0, 1))
    order = sorted((int(d) for d in torch.nonzero(ok).flatten()), key=lambda d: (-float(share[d]), -float(strength[d])))
    return tuple(sorted(order[:max_dims]))


def _probe_ids(model) -> torch.Tensor:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    vocab = config.vocab_size
    special = {getattr(config, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    special |= {getattr(model.config, k, None) for k in ("image_token_id", "image_token_index", "video_token_id")}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (4, 32), generator=gen)
    for s in special:  # plain text tokens only: no image placeholders
        if isinstance(s, int):
            ids[ids == s] = 3 + (s + 1) % max(1, vocab - 3)
    bos = getattr(config, "bos_token_id", None)
    if isinstance(bos, int) and 0 <= bos < vocab:
        ids[:, 0] = bos
    return ids


def sink_dims_for(model: torch.nn.Module, tau: float) -> tuple[int, ...]:
    """`find_sink_dims(model, tau)`, computed once per model and tau."""
    found = _FOUND.setdefault(model, {})
    if tau not in found:
        found[tau] = find_sink_dims(model, tau)
    return found[tau]


def compile(spec: VarSpec, info, model=None) -> list:
    if spec.sink_dims == "auto":
        if model is None:
            raise UnsupportedModelError("VAR with sink_dims: auto needs the loaded model to find its sink dimensions")
        dims = sink_dims_for(model, spec.tau)
    else:
        dims = tuple(spec.sink_dims)
    out: list = [Detect(None, ImageTokens(info.image_token_id))]
    sinks = HiddenSinks(dims, spec.tau)
    gate = Gate(num=KeySet(on=IMAGE | HSINK), den=KeySet(on=IMAGE), max_ratio=spec.rho, min_den=spec.min_image_mass)
    for layer, heads in spec.targets(info).items():
        out.append(Detect(layer, sinks))
        out.append(
            MoveEffect(
                layer, tuple(heads), KeySet(on=HSINK), KeySet(on=IMAGE, off=HSINK), spec.p, gate=gate, after_image=True
            )
        )
    return out


def find(spec: VarSpec, cal: Calibration) -> Found:
    """VAR's offline statistic: resolve `sink_dims: auto` to the model's sink dimensions (no task needed)."""
    dims = list(find_sink_dims(cal.model, spec.tau))
    chosen = {
        "sink_dims": dims,
        "tau": spec.tau,
        "rule": "first token above tau in >= half of layers 2..L-1, median token below",
    }
    return Found([spec.model_copy(update={"sink_dims": dims})], [], chosen, None, {})


def resolve(spec: VarSpec, effects: list) -> VarSpec:
    """The spec with `sink_dims: auto` replaced by the dimensions its compile step found (for export)."""
    if spec.sink_dims != "auto":
        return spec
    dims = next((e.detector.dims for e in effects if isinstance(e, Detect) and isinstance(e.detector, HiddenSinks)), ())
    return spec.model_copy(update={"sink_dims": list(dims)})


METHOD = register(
    Method(
        name="var",
        schema=VarSpec,
        compile=compile,
        summary="VAR: move attention from sink tokens to the image's non-sink tokens in image-centric rows",
        emits=(Detect, MoveEffect),
        per_input=True,  # sinks are detected in each input's hidden states at prefill
        reads_weights=lambda spec: spec.sink_dims == "auto",
        resolve=resolve,
        search=Search(find=find, about="the model's massive-activation (sink) dimensions, from its hidden states"),
    )
)
