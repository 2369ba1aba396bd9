"""The real model set's architectures, from explicit config objects (no hub, no weights).

Numbers are those of the published configs:

- SD-1.5 (``stable-diffusion-v1-5``): VAE ``AutoencoderKL`` with block channels 128/256/512/512,
  2 layers per block, 4 latent channels, 512 px; UNet with 320/640/1280/1280 channels, 2 layers
  per block, cross-attention dim 768, 8 heads; CLIP ViT-L/14 text encoder (12 layers, 768 wide,
  3072 MLP, 77 positions, 49408 tokens).
- BLIP-2 stage-1 (``Salesforce/blip2-itm-vit-g``): EVA ViT-g/14 at 224 px with the last of its 40
  layers removed as LAVIS does (39 layers, 1408 wide, 16 heads, 6144 MLP); Q-Former = bert-base
  (12 layers, 768 wide, 12 heads, 3072 MLP, cross-attention every 2 layers to the 1408-wide image
  tokens, 30523 tokens with [DEC]), 32 queries, ITM head, and the LAVIS BERT LM head (caption).
- BLIP VQA (``model_base_vqa_capfilt_large``): ViT-B/16 at 480 px (768 wide, 12 layers, 3072 MLP);
  BERT-base text encoder and answer decoder with cross-attention (30524 tokens with [DEC], [ENC]).

``build_real_models(device)`` instantiates them; on ``meta`` nothing is allocated (FLOP counting),
on ``cuda`` they get random weights (benchmarks/gpu.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

QFORMER_VOCAB = 30523  # bert-base-uncased + [DEC] (LAVIS's BLIP-2 tokenizer)
VQA_VOCAB = 30524  # bert-base-uncased + [DEC] + [ENC] (BLIP's tokenizer)


def vae_kwargs() -> dict[str, Any]:
    return dict(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=512, scaling_factor=0.18215,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, act_fn="silu",
    )


def unet_kwargs() -> dict[str, Any]:
    return dict(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        norm_num_groups=32,
    )


def clip_text_config():
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    )


def blip2_config():
    from transformers import Blip2Config

    return Blip2Config(
        vision_config=dict(
            hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16,
            image_size=224, patch_size=14, qkv_bias=True, layer_norm_eps=1e-6, initializer_range=0.02,
        ),
        qformer_config=dict(
            vocab_size=QFORMER_VOCAB, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, cross_attention_frequency=2, encoder_hidden_size=1408,
            max_position_embeddings=512, use_qformer_text_input=True,
        ),
        num_query_tokens=32,
        image_text_hidden_size=256,
    )


def blip_vqa_config():
    from transformers import BlipConfig

    return BlipConfig(
        vision_config=dict(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            image_size=480, patch_size=16,
        ),
        text_config=dict(
            vocab_size=VQA_VOCAB, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, encoder_hidden_size=768, max_position_embeddings=512,
            bos_token_id=30522, pad_token_id=0, sep_token_id=102, eos_token_id=102,
        ),
    )


@dataclass
class RealModels:
    vae: Any
    unet: Any
    text_encoder: Any
    referee: Any  # Blip2ForImageTextRetrieval
    caption_head: Any  # Blip2CaptionHead
    vqa: Any  # BlipForQuestionAnswering

    def modules(self) -> dict[str, torch.nn.Module]:
        return {k: getattr(self, k) for k in ("vae", "unet", "text_encoder", "referee", "caption_head", "vqa")}


def build_real_models(device: str | torch.device = "meta", dtype: torch.dtype = torch.float32) -> RealModels:
    """Every real-size network, frozen, on ``device`` (``meta``: shapes only, no memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import Blip2ForImageTextRetrieval, BlipForQuestionAnswering, CLIPTextModel

    from pipeline.models.caption_head import Blip2CaptionHead, Blip2CaptionHeadConfig
    from pipeline.models.quiet import quiet_library_logs

    quiet_library_logs()
    with torch.device(device):
        models = RealModels(
            vae=AutoencoderKL(**vae_kwargs()),
            unet=UNet2DConditionModel(**unet_kwargs()),
            text_encoder=CLIPTextModel(clip_text_config()),
            referee=Blip2ForImageTextRetrieval(blip2_config()),
            caption_head=Blip2CaptionHead(Blip2CaptionHeadConfig(hidden_size=768, vocab_size=QFORMER_VOCAB)),
            vqa=BlipForQuestionAnswering(blip_vqa_config()),
        )
    for m in models.modules().values():
        m.to(dtype=dtype)
        m.eval()
        m.requires_grad_(False)
    return models


def parameter_counts(models: RealModels) -> dict[str, int]:
    r = models.referee
    return {
        "vae_decoder": sum(p.numel() for p in models.vae.decoder.parameters())
        + sum(p.numel() for p in models.vae.post_quant_conv.parameters()),
        "unet": sum(p.numel() for p in models.unet.parameters()),
        "clip_text_encoder": sum(p.numel() for p in models.text_encoder.parameters()),
        "referee_vit": sum(p.numel() for p in r.vision_model.parameters()),
        "referee_qformer": sum(p.numel() for p in r.qformer.parameters()),
        "vqa": sum(p.numel() for p in models.vqa.parameters()),
    }


# ---- the zoo referees and the non-VQA scorers (configs/zoo.yaml, scoring.clip_model, scoring.detector_model) ----


def clip_config(large: bool):
    """``openai/clip-vit-large-patch14`` (the zoo's CLIP referee: ViT-L/14 at 224, 1024 wide, 24 layers,
    projection 768) or ``openai/clip-vit-base-patch32`` (CLIPScore: ViT-B/32, 768 wide, 12 layers, 512)."""
    from transformers import CLIPConfig

    text = dict(vocab_size=49408, hidden_size=768 if large else 512, intermediate_size=3072 if large else 2048,
                num_hidden_layers=12, num_attention_heads=12 if large else 8, max_position_embeddings=77,
                hidden_act="quick_gelu")
    vision = dict(hidden_size=1024 if large else 768, intermediate_size=4096 if large else 3072,
                  num_hidden_layers=24 if large else 12, num_attention_heads=16 if large else 12, image_size=224,
                  patch_size=14 if large else 32, hidden_act="quick_gelu")
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=768 if large else 512)


def owlv2_config():
    """``google/owlv2-base-patch16-ensemble``: ViT-B/16 at 960 px (3,600 patches), 512-wide text tower with
    16 positions, projection 512; class and box heads on every patch token."""
    from transformers import Owlv2Config

    return Owlv2Config(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=16),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=960, patch_size=16),
        projection_dim=512,
    )


@dataclass
class ZooRealModels:
    clip_large: Any  # CLIPModel, the zoo's CLIP referee
    clip_score: Any  # CLIPModel, CLIPScore's ViT-B/32
    owlv2: Any  # Owlv2ForObjectDetection: the zoo's detector referee and the spatial scorer


def build_zoo_models(device: str | torch.device = "meta", dtype: torch.dtype = torch.float32) -> ZooRealModels:
    from transformers import CLIPModel, Owlv2ForObjectDetection

    from pipeline.models.quiet import quiet_library_logs

    quiet_library_logs()
    with torch.device(device):
        models = ZooRealModels(CLIPModel(clip_config(True)), CLIPModel(clip_config(False)),
                               Owlv2ForObjectDetection(owlv2_config()))
    for m in (models.clip_large, models.clip_score, models.owlv2):
        m.to(dtype=dtype)
        m.eval()
        m.requires_grad_(False)
    return models
