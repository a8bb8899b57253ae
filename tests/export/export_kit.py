"""Helpers of the export tests: a tiny tokenizer, a tiny LLaVA with its processor, comparisons."""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch

import attnedit
import models

IMAGE_TOKEN_ID = 255
exp = importlib.import_module("attnedit.export")  # the module (attnedit.export is the function)


def tiny_tokenizer(image: bool = False):
    """A 256-word tokenizer: <pad> <s> </s> <unk>, words w4 .. w254, and <image> (255) for VLMs."""
    from tokenizers import Tokenizer, models as tkm, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i for i in range(4, 255)}, "<image>": IMAGE_TOKEN_ID}
    inner = Tokenizer(tkm.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if image:
        tok.add_tokens(["<image>"], special_tokens=True)  # matched inside runs such as <image><image>
    return tok


def tiny_llava(seed: int = 0):
    """A tiny LLaVA (2-layer CLIP vision tower, 4-layer Llama text) and its processor."""
    from transformers import (
        CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor,
    )

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    text = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        vocab_size=256, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(3.0)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=images, tokenizer=tiny_tokenizer(image=True), patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    return model, processor


def llava_inputs(processor):
    """One prompt with an image (16 image tokens after expansion)."""
    image = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")
    return processor(images=[image], text=["w5 w6 <image> w9 w10 w11 w12"], return_tensors="pt")


def rel(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return ((a - b).norm() / b.norm()).item()


def recipe(text: str) -> attnedit.Recipe:
    return attnedit.Recipe.from_str(text, "test.yaml")


def tree(path: Path) -> dict[str, bytes]:
    """Every file under `path` (relative name -> bytes): to check a folder is exactly as it was."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
