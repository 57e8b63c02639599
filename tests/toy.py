"""A toy conditional, multi-modal action distribution and a tiny WAM trained on it (CPU, seconds).

Condition c in {0, 1} is a fixed random text embedding. Each condition has two modes with
probability 1/2; a chunk's rows all come from the chunk's mode (centre + independent Gaussian
noise of std ``MODE_STD``). Condition 0's modes sit on one diagonal, condition 1's on the other,
so a sampler that ignores the text lands in the wrong modes half the time. The video latents are a
constant per condition (``VIDEO_LEVEL[c]``), so the video output is checked too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch

import wam_fast
from wam_fast.schedules import diffusion_loss

# CENTRES[c] = the two mode centres of condition c, in action space (action_dim = 2).
CENTRES = torch.tensor([[[1.0, 1.0], [-1.0, -1.0]],
                        [[1.0, -1.0], [-1.0, 1.0]]])
MODE_STD = 0.25
VIDEO_LEVEL = (-0.5, 0.5)
ACTION_LEN = 2


def toy_config(objective: str) -> wam_fast.WAMConfig:
    # "tiny" with 4x4 latents and 2 text tokens: 2 + 2 x 4 + 2 = 12 tokens, so training is seconds on CPU.
    return wam_fast.configs.get("tiny", action_dim=2, action_len=ACTION_LEN, objective=objective,
                                latent_height=4, latent_width=4, text_len=2)


def condition_texts(config, seed: int = 1234) -> torch.Tensor:
    """(2, text_len, text_dim): the text embedding of condition 0 and of condition 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, config.text_len, config.text_dim), generator=g)


def toy_batch(config, texts: torch.Tensor, batch: int, generator: torch.Generator):
    """A batch of (video, text, actions, cond, mode) drawn from the toy distribution."""
    cond = torch.randint(0, 2, (batch,), generator=generator)
    mode = torch.randint(0, 2, (batch,), generator=generator)
    centre = CENTRES[cond, mode]  # (B, 2)
    actions = centre[:, None, :] + MODE_STD * torch.randn((batch, config.action_len, 2), generator=generator)
    level = torch.tensor(VIDEO_LEVEL)[cond]
    video = level.view(-1, 1, 1, 1, 1).expand(
        batch, config.noisy_frames, config.latent_channels, config.latent_height, config.latent_width)
    return video.contiguous(), texts[cond], actions, cond, mode


def train_toy_model(objective: str, steps: int = 400, batch: int = 256, lr: float = 2e-3,
                    cond_dropout: float = 0.15, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = toy_config(objective)
    model = wam_fast.WAMTransformer(config)
    texts = condition_texts(config)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    for _ in range(steps):
        video, text, actions, _, _ = toy_batch(config, texts, batch, g)
        loss = diffusion_loss(model, video, text, actions, generator=g, cond_dropout=cond_dropout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    model.final_loss = loss.item()
    return model


@dataclass
class ModeStats:
    """How a sample set of one condition compares with that condition's two modes."""

    fractions: tuple  # share of chunks assigned to each own mode
    mean_errors: tuple  # |sample mean of a mode - true centre| (Euclidean)
    spreads: tuple  # per-coordinate std of the rows around their mode's sample mean
    off_mode: float  # share of chunks whose rows are not all within OFF_MODE_RADIUS of one own centre
    wrong_condition: float  # share of chunks whose mean is nearest to the other condition's centres

    def as_dict(self) -> Dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


OFF_MODE_RADIUS = 4 * MODE_STD  # a row further than 4 std from its mode centre is off-mode


def mode_stats(actions: torch.Tensor, cond: int) -> ModeStats:
    """actions (N, K, 2) all sampled with condition ``cond``."""
    actions = actions.float()
    chunk_mean = actions.mean(dim=1)  # (N, 2)
    all_centres = CENTRES.reshape(4, 2)  # index 2 c + m
    nearest = torch.cdist(chunk_mean, all_centres).argmin(dim=1)
    wrong_condition = (nearest // 2 != cond).float().mean().item()
    own = CENTRES[cond]
    mode = torch.cdist(chunk_mean, own).argmin(dim=1)  # (N,)
    row_dist = (actions - own[mode][:, None, :]).norm(dim=-1)  # (N, K)
    off_mode = (row_dist > OFF_MODE_RADIUS).any(dim=1).float().mean().item()
    fractions, mean_errors, spreads = [], [], []
    for m in range(2):
        rows = actions[mode == m].reshape(-1, 2)
        fractions.append((mode == m).float().mean().item())
        if len(rows) < 2:
            mean_errors.append(float("inf"))
            spreads.append(0.0)
            continue
        mean_errors.append((rows.mean(dim=0) - own[m]).norm().item())
        spreads.append(rows.std(dim=0).mean().item())
    return ModeStats(tuple(fractions), tuple(mean_errors), tuple(spreads), off_mode, wrong_condition)
