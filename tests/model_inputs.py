"""Random inputs of the right shapes for a WAMTransformer (shared by tests)."""
import torch


def random_inputs(model, batch=2, num_history=0, with_image=True, dtype=None, generator=None):
    c = model.config
    p = next(model.parameters())
    dtype = dtype or p.dtype
    kw = dict(dtype=dtype, device=p.device, generator=generator)
    frame = (c.latent_channels, c.latent_height, c.latent_width)
    inputs = dict(
        video=torch.randn(model.noisy_video_shape(batch), **kw),
        text=torch.randn(batch, c.text_len, c.text_dim, **kw),
        actions=torch.randn(model.action_shape(batch), **kw),
        timestep=torch.rand(batch, generator=generator, device=p.device) * (c.num_train_timesteps - 1),
        image=torch.randn(batch, 1, *frame, **kw) if with_image else None,
    )
    if num_history:
        inputs["history"] = torch.randn(batch, num_history, *frame, **kw)
    return inputs


def episode(model, batch=1, steps=3, seed=1):
    """A text embedding and ``steps`` current frames for a robot-loop test."""
    g = torch.Generator().manual_seed(seed)
    c = model.config
    text = torch.randn(batch, c.text_len, c.text_dim, generator=g)
    frames = [torch.randn(batch, 1, c.latent_channels, c.latent_height, c.latent_width, generator=g)
              for _ in range(steps)]
    return text, frames
