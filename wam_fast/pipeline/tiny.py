"""``WAMPipeline.tiny_random``: every part random and tiny, built on the fly (nothing downloaded), a few
seconds on CPU: a 1-layer T5 encoder with a word-level tokenizer trained on a few words, a 2-block
CogVideoX VAE (32x32 frames -> 4 x 16 x 16 latents) and a 1-step shortcut student with the temporal mask."""
from __future__ import annotations

import torch

from wam_fast.configs import WAMConfig
from wam_fast.models.transformer import WAMTransformer
from wam_fast.pipeline.encoders import CogVideoXEncoder, require
from wam_fast.pipeline.text import T5TextEncoder

WORDS = "open close the drawer door push pull pick place puck block button window red green blue to on in"
IMAGE_SIZE = 32


def tiny_tokenizer():
    """A word-level tokenizer over WORDS, wrapped as a transformers fast tokenizer (pad 0, eos 1, unk 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([WORDS], trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_config() -> WAMConfig:
    return WAMConfig(name="tiny-pipeline", num_layers=2, num_heads=2, head_dim=16, text_len=8, text_dim=32,
                     latent_channels=4, latent_frames=2, latent_height=IMAGE_SIZE // 2, latent_width=IMAGE_SIZE // 2,
                     patch_size=4, action_len=4, action_dim=7, mask="temporal", history_frames=2,
                     objective="flow_matching", distillation="shortcut", distilled_steps=(1, 2))


def tiny_random(cls, seed: int = 0, **options):
    require("transformers")
    require("diffusers")
    from diffusers import AutoencoderKLCogVideoX
    from transformers import T5Config, T5EncoderModel

    config = tiny_config()
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=config.text_dim, d_kv=8, d_ff=64, num_layers=1,
                                 num_heads=4, pad_token_id=0, eos_token_id=1))
    vae = AutoencoderKLCogVideoX(down_block_types=("CogVideoXDownBlock3D",) * 2,
                                 up_block_types=("CogVideoXUpBlock3D",) * 2, block_out_channels=(8, 16),
                                 latent_channels=config.latent_channels, layers_per_block=1, norm_num_groups=4,
                                 sample_height=IMAGE_SIZE, sample_width=IMAGE_SIZE)
    model = WAMTransformer(config).eval()
    return cls(model, CogVideoXEncoder(vae, (IMAGE_SIZE, IMAGE_SIZE)), T5TextEncoder(t5, tokenizer, config.text_len),
               **options)
