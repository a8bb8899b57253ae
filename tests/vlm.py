"""Tiny random vision-language models built from real published configs, with offline processors.

Each entry keeps the architecture-defining fields of a real `config.json`
(vision tower kind, feature layer and selection, projector, rope and mrope
sections, grouped-query ratio, token ids of the image placeholders) and shrinks
the sizes. The processors are the models' own classes, built offline around a
small word-level tokenizer that holds the models' special image tokens; images
are drawn with numpy and PIL.

    model, processor = vlm.tiny("llava")
    batch = vlm.inputs(processor, ["<image>\\nWhat is here?", "<image>\\nA longer question about it?"])
"""

from __future__ import annotations

import numpy as np
import torch

WORDS = (
    "a an the is are what where who how many color colour of in on at this that image picture photo show shows "
    "describe there here it and or to with cat dog car red blue green big small left right question answer "
    "yes no one two three please look see object objects longer about"
).split()
SPECIAL = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "<image>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<fake_token_around_image>",
    "<global-img>",
    "<end_of_utterance>",
]

REAL_CONFIGS = {
    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336 tower, 2-layer GELU projector, features of layer -2 without CLS
    "llava": dict(
        model_type="llava",
        image_token_index=32000,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
        multimodal_projector_bias=True,
        text_config=dict(
            model_type="llama",
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            rms_norm_eps=1e-5,
            vocab_size=32064,
            max_position_embeddings=4096,
            rope_theta=10000.0,
            hidden_act="silu",
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=336,
            patch_size=14,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
    ),
    # Qwen/Qwen2-VL-2B-Instruct: 3-D rope (mrope), 2x2 patch merger, grouped-query text decoder
    "qwen2_vl": dict(
        model_type="qwen2_vl",
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        text_config=dict(
            model_type="qwen2_vl_text",
            hidden_size=1536,
            intermediate_size=8960,
            num_hidden_layers=28,
            num_attention_heads=12,
            num_key_value_heads=2,
            rms_norm_eps=1e-6,
            vocab_size=151936,
            max_position_embeddings=32768,
            hidden_act="silu",
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        ),
        vision_config=dict(
            depth=32,
            embed_dim=1280,
            hidden_size=1536,
            hidden_act="quick_gelu",
            mlp_ratio=4,
            num_heads=16,
            in_channels=3,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
    ),
    # HuggingFaceTB/SmolVLM-256M-Instruct (Idefics3 architecture): SigLIP tower, pixel-shuffle connector
    # (scale factor 4), SmolLM2-135M text decoder
    "smolvlm": dict(
        model_type="idefics3",
        scale_factor=4,
        image_token_id=49190,
        text_config=dict(
            model_type="llama",
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            rms_norm_eps=1e-5,
            vocab_size=49280,
            max_position_embeddings=8192,
            rope_theta=100000.0,
            hidden_act="silu",
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            image_size=512,
            patch_size=16,
            hidden_act="gelu_pytorch_tanh",
        ),
    ),
}

# The shrink: sizes and the placeholder ids of the small tokenizer only.
_SHRINK = {
    "llava": dict(
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=56,
            projection_dim=32,
        ),
        image_seq_length=16,
    ),
    "qwen2_vl": dict(
        text_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2),
    ),
    "smolvlm": dict(
        text_config=dict(
            hidden_size=72, intermediate_size=128, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=128
        ),
    ),
}
IMAGE_SIZE = {"llava": 56, "qwen2_vl": 56, "smolvlm": 128}
VLMS = tuple(REAL_CONFIGS)


def tokenizer():
    """A small word-level fast tokenizer (with offsets) holding the image placeholder tokens."""
    from tokenizers import Tokenizer, pre_tokenizers  # noqa: PLC0415
    from tokenizers.models import WordLevel  # noqa: PLC0415
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + list(".,?!:\n"))}
    core = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL[4:],
    )
    tok.padding_side = "left"
    return tok


def _ids(tok) -> dict:
    get = tok.convert_tokens_to_ids
    return {
        "image": get("<image>"),
        "pad": get("<|image_pad|>"),
        "video": get("<|video_pad|>"),
        "start": get("<|vision_start|>"),
        "end": get("<|vision_end|>"),
    }


def tiny_config(name: str, tok=None):
    from transformers import AutoConfig  # noqa: PLC0415

    tok = tok or tokenizer()
    fields = {k: (dict(v) if isinstance(v, dict) else v) for k, v in REAL_CONFIGS[name].items()}
    for key, value in _SHRINK[name].items():
        fields[key] = {**fields[key], **value} if isinstance(value, dict) else value
    fields["text_config"].update(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    ids = _ids(tok)
    if name == "llava":
        fields["image_token_index"] = ids["image"]
    elif name == "smolvlm":
        fields["image_token_id"] = ids["image"]
    else:
        fields.update(
            image_token_id=ids["pad"],
            video_token_id=ids["video"],
            vision_start_token_id=ids["start"],
            vision_end_token_id=ids["end"],
        )
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def processor(name: str, tok=None):
    """The model's own processor class, built offline around the small tokenizer."""
    tok = tok or tokenizer()
    if name == "llava":
        from transformers import CLIPImageProcessor, LlavaProcessor  # noqa: PLC0415

        images = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
        return LlavaProcessor(
            image_processor=images,
            tokenizer=tok,
            patch_size=14,
            vision_feature_select_strategy="default",
            image_token="<image>",
            num_additional_image_tokens=1,
        )
    if name == "smolvlm":
        from transformers import Idefics3ImageProcessor, Idefics3Processor  # noqa: PLC0415

        edge = {"longest_edge": IMAGE_SIZE[name]}
        images = Idefics3ImageProcessor(do_image_splitting=False, size=edge, max_image_size=edge)
        return Idefics3Processor(image_processor=images, tokenizer=tok, image_seq_len=4)  # (128/16)^2 / 4^2 tokens
    from transformers import Qwen2VLImageProcessor  # noqa: PLC0415

    images = Qwen2VLImageProcessor(
        min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2, temporal_patch_size=2
    )
    return _qwen2_vl_images_only()(images, tok)


def _qwen2_vl_images_only():
    """Qwen2VLProcessor without its video processor (that class needs torchvision, not installed here)."""
    from transformers import Qwen2VLProcessor  # noqa: PLC0415
    from transformers.processing_utils import ProcessorMixin  # noqa: PLC0415

    class ImagesOnly(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImagesOnly


def tiny(name: str, seed: int = 0, dtype=torch.float32):
    """(model, processor): a tiny random VLM of the named architecture, eval mode, SDPA attention."""
    from transformers import AutoModelForImageTextToText  # noqa: PLC0415

    tok = tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(tiny_config(name, tok), attn_implementation="sdpa", dtype=dtype)
    with torch.no_grad():  # sharper attention than the init, so that edits change outputs
        for n, p in model.named_parameters():
            if p.dim() == 2 and "language_model" in n:
                p.mul_(3.0)
    return model.eval(), processor(name, tok)


def images(n: int, size: int = 56, seed: int = 0):
    """n RGB PIL images: random colour blocks on a noisy background."""
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        arr = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
        y, x = rng.integers(0, size // 2, 2)
        arr[y : y + size // 2, x : x + size // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
        out.append(Image.fromarray(arr))
    return out


IMAGE_TEXT = {"llava": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>", "smolvlm": "<image>"}


def inputs(proc, questions: list[str], name: str = "llava", seed: int = 0):
    """A left-padded batch with one image per prompt; '<image>' in a question marks where it goes."""
    texts = [q.replace("<image>", IMAGE_TEXT[name]) for q in questions]
    pics = images(len(texts), size=IMAGE_SIZE[name], seed=seed)
    if name == "smolvlm":
        pics = [[p] for p in pics]  # Idefics3 takes a list of images per prompt
    return proc(text=texts, images=pics, return_tensors="pt", padding=True)
