"""What attnedit needs to know of a model, read from its config alone (no weights)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class ModelInfo:
    """Shape facts of a model's text decoder.

    Attributes:
        name: how the user named the model (alias, hub id, path).
        model_type: the config's model_type (of the whole model, e.g. 'llava').
        n_layers, n_heads, n_kv_heads, head_dim, hidden_size: the text decoder's attention shape.
        image_token_id: the id of the image placeholder token for vision-language models, else None.
        layer_types: per layer 'full_attention' / 'sliding_attention' where the config says.
    """

    name: str
    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    image_token_id: int | None = None
    layer_types: tuple[str, ...] = field(default=())

    @property
    def is_vlm(self) -> bool:
        return self.image_token_id is not None

    @classmethod
    def from_config(cls, config, name: str = "") -> "ModelInfo":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        n_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
        image_token_id = None
        for key in ("image_token_id", "image_token_index"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                image_token_id = value
                break
        layer_types = tuple(getattr(text, "layer_types", None) or ())
        return cls(
            name=name or getattr(config, "_name_or_path", "") or config.model_type,
            model_type=config.model_type,
            n_layers=text.num_hidden_layers,
            n_heads=n_heads,
            n_kv_heads=getattr(text, "num_key_value_heads", None) or n_heads,
            head_dim=head_dim,
            hidden_size=text.hidden_size,
            image_token_id=image_token_id,
            layer_types=layer_types,
        )


def text_decoder(model):
    """The text decoder module of a causal LM or vision-language model (holds `.layers`)."""
    import torch  # noqa: PLC0415  (heavy: reading a config for `attnedit validate` needs no torch)

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    if not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no text decoder with a `layers` list that attnedit can find"
        )
    return decoder


def decoder_layers(model):
    """The text decoder's blocks, each with a `self_attn` module."""
    layers = text_decoder(model).layers
    if not all(hasattr(layer, "self_attn") for layer in layers):
        raise UnsupportedModelError(f"the decoder layers of {type(model).__name__} have no `self_attn` module")
    return layers
