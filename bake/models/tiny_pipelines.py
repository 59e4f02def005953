"""Small text-to-image pipelines with random weights, built from configs (no downloads).

No text-to-image weights can be had offline, and exactness needs none: these pipelines have the
real classes (UNet2DConditionModel + CLIP for Stable Diffusion, the same with two CLIP encoders and
text-time conditioning for SDXL, FluxTransformer2DModel + CLIP + T5
for FLUX, PixArtTransformer2DModel + T5 for PixArt-α) at toy sizes. Tests, `bake families` and the
benchmark use them. Norm weights and biases are randomised so that folds into them are exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch

KINDS = ("sd", "sdxl", "flux", "pixart")
WORDS = ("a photo of a cat dog house tree car in the style of van gogh watercolor oil painting pink elephant "
         "red blue green sky city night day portrait landscape with without sketch").split()


def tokenizer(max_length: int = 16):
    """A word-level fast tokenizer over a small vocabulary (pipelines pad to `model_max_length`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="</s>", model_max_length=max_length)


def _clip(seed: int, hidden: int = 32, projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=1, eos_token_id=1,
                         pad_token_id=0, projection_dim=hidden)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)


def _t5(seed: int, d: int = 32):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=64, d_model=d, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                   feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1))


def _vae(seed: int, latent: int = 4, **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=latent, **extra,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=4, sample_size=16)


def _rough(*modules: torch.nn.Module) -> None:
    with torch.no_grad():
        for mod in modules:
            for m in mod.modules():
                if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and getattr(m, "weight", None) is not None:
                    m.weight.copy_(1 + 0.2 * torch.randn_like(m.weight))
                    if m.bias is not None:
                        m.bias.copy_(0.1 * torch.randn_like(m.bias))


def tiny_pipeline(kind: str = "sd", seed: int = 0, width: int = 16, sample_size: int = 8):
    """A random-weight pipeline of `kind` (sd, flux, pixart) at toy size. For `sd`, `width` scales the
    UNet's channels (16 → 16/32; the benchmark uses 64) and `sample_size` its latent side."""
    if kind == "sd":
        from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

        torch.manual_seed(seed)
        unet = UNet2DConditionModel(block_out_channels=(width, 2 * width), layers_per_block=1,
                                    sample_size=sample_size, in_channels=4, out_channels=4,
                                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                    norm_num_groups=4, attention_head_dim=4)
        text = _clip(seed + 1)
        _rough(unet, text)
        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=_vae(seed + 2), text_encoder=text, tokenizer=tokenizer(), unet=unet,
                                       scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif kind == "sdxl":
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

        torch.manual_seed(seed)
        unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=sample_size,
                                    in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
                                    projection_class_embeddings_input_dim=8 * 6 + 32, cross_attention_dim=64,
                                    norm_num_groups=4)
        te1, te2 = _clip(seed + 1), _clip(seed + 4, projection=True)
        _rough(unet, te1, te2)
        sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
        pipe = StableDiffusionXLPipeline(vae=_vae(seed + 2), text_encoder=te1, text_encoder_2=te2, tokenizer=tokenizer(),
                                         tokenizer_2=tokenizer(), unet=unet, scheduler=sched)
    elif kind == "flux":
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        torch.manual_seed(seed)
        tr = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                    pooled_projection_dim=32, axes_dims_rope=[2, 2, 4])
        clip, t5 = _clip(seed + 1, projection=False), _t5(seed + 3)
        _rough(tr, clip, t5)
        pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=_vae(seed + 2, latent=4, shift_factor=0.0),
                            text_encoder=clip, tokenizer=tokenizer(), text_encoder_2=t5, tokenizer_2=tokenizer(),
                            transformer=tr)
    elif kind == "pixart":
        from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

        torch.manual_seed(seed)
        tr = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                      num_attention_heads=2, caption_channels=32, in_channels=4, out_channels=8,
                                      cross_attention_dim=16, norm_elementwise_affine=False, norm_eps=1e-6)
        t5 = _t5(seed + 3)
        _rough(tr, t5)
        pipe = PixArtAlphaPipeline(tokenizer=tokenizer(), text_encoder=t5, vae=_vae(seed + 2), transformer=tr,
                                   scheduler=DDIMScheduler(steps_offset=1))
    else:
        raise ValueError(f"tiny pipeline kind {kind!r} (known: {', '.join(KINDS)})")
    pipe.set_progress_bar_config(disable=True)
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    return pipe


def save_tiny_pipeline(kind: str, path: str | Path, seed: int = 0, **size) -> Path:
    pipe = tiny_pipeline(kind, seed, **size)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return Path(path)
