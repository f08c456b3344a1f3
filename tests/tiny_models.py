"""Tiny randomly initialised diffusers pipelines and a tiny T5, built from configs offline.

They stand in for Stable Diffusion v1.4, SDXL and the T5 prompt model in tests: same classes,
same loading code (`from_pretrained` on a saved folder), no download.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["a", "photo", "of", "the", "cat", "dog", "ship", "on", "rock", "sea", "in", "small", "big",
         "red", "blue", "white", "sitting", "grass", "water", "<|startoftext|>", "<|endoftext|>"]  # fmt: skip


def clip_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab.update({f"{w}</w>": len(WORDS) + i for i, w in enumerate(WORDS[:-2])})
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77
    )


def _clip_text(projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=8)  # fmt: skip
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=8,
                         sample_size=32)  # fmt: skip


def save_tiny_sd(folder: Path) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=8, norm_num_groups=8, attention_head_dim=2)  # fmt: skip
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=_clip_text(), tokenizer=clip_tokenizer(folder / "_tok"),
                                   unet=unet, scheduler=DDIMScheduler(steps_offset=1, clip_sample=False), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(str(folder))
    return folder


def save_tiny_sdxl(folder: Path) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=16, norm_num_groups=8, attention_head_dim=2,
                                addition_embed_type="text_time", addition_time_embed_dim=4,
                                projection_class_embeddings_input_dim=8 + 6 * 4,
                                transformer_layers_per_block=1)  # fmt: skip
    tok = clip_tokenizer(folder / "_tok")
    pipe = StableDiffusionXLPipeline(vae=_vae(), text_encoder=_clip_text(), text_encoder_2=_clip_text(True),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet,
                                     scheduler=EulerDiscreteScheduler())  # fmt: skip
    pipe.save_pretrained(str(folder))
    return folder


def save_tiny_t5(folder: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS[:-2])}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(vocab), d_model=8, d_ff=16, d_kv=4, num_layers=1, num_heads=2,
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)  # fmt: skip
    T5ForConditionalGeneration(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder
