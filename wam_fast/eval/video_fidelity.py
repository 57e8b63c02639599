"""Does a student keep its teacher's imagination? The predicted frame against the frame observed.

``measure_video`` runs a row's policy (a pipeline that decodes its predicted video) closed loop on
held-out episodes for ``rounds`` chunks, executing every action of each chunk, and compares the frame
the model predicted for the end of the chunk with the frame rendered there: PSNR and SSIM in pixel
space (uint8 RGB, decoded through the frozen autoencoder where the task uses one). The same states
give two references: "hold", the current frame as the prediction of the next, which a model that
imagines nothing (or only blurs) does not beat; and "decoder", the observed frame encoded and decoded
again, the best any prediction through that frame encoder can score (exact for pixels).

``psnr`` and ``ssim`` follow the usual definitions: PSNR = 10 log10(255^2 / MSE); SSIM of Wang et al.
(2004) with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, averaged over the valid
window positions and the three channels.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


VIDEO_KEYS = ("video_psnr", "video_ssim", "video_psnr_hold", "video_ssim_hold", "video_psnr_decoder",
              "video_ssim_decoder", "video_frames", "video_rounds")
PSNR_MAX = 100.0  # dB for equal frames (one level off in one pixel of a 64x64 frame is 89 dB)


def _check_images(predicted: np.ndarray, observed: np.ndarray) -> None:
    for name, image in (("predicted", predicted), ("observed", observed)):
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim < 3 or image.shape[-1] != 3:
            raise ValueError(f"{name} must be uint8 RGB images (..., H, W, 3), got "
                             f"{getattr(image, 'dtype', type(image).__name__)} {getattr(image, 'shape', '')}")
    if predicted.shape != observed.shape:
        raise ValueError(f"predicted and observed frames differ in shape: {predicted.shape} vs {observed.shape}")


def psnr(predicted: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 RGB (..., H, W, 3) pairs, at most ``PSNR_MAX`` (equal frames)."""
    _check_images(predicted, observed)
    error = (predicted.astype(np.float64) - observed.astype(np.float64)) ** 2
    mse = error.reshape(*error.shape[:-3], -1).mean(-1)
    with np.errstate(divide="ignore"):
        return np.minimum(10.0 * np.log10(255.0 ** 2 / mse), PSNR_MAX)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def ssim(predicted: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Per-image SSIM of uint8 RGB (..., H, W, 3) pairs (H, W >= 11), in [-1, 1]; 1 where equal."""
    _check_images(predicted, observed)
    if min(predicted.shape[-3:-1]) < 11:
        raise ValueError(f"SSIM's 11x11 window needs frames of at least 11x11 pixels, got {predicted.shape[-3:-1]}")
    batch = predicted.shape[:-3]
    x, y = (torch.from_numpy(np.ascontiguousarray(a)).to(torch.float64).reshape(-1, *a.shape[-3:]).movedim(-1, 1)
            for a in (predicted, observed))
    g = _gaussian_window()
    kernel_h = g.view(1, 1, -1, 1).expand(3, 1, -1, 1)
    kernel_w = g.view(1, 1, 1, -1).expand(3, 1, 1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kernel_h, groups=3), kernel_w, groups=3)

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    index = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return index.mean((1, 2, 3)).reshape(batch).numpy()


def measure_video(policy, envs, text: torch.Tensor, rounds: int) -> dict:
    """Closed-loop on ``envs`` (episode i on held-out layout i mod 50) for ``rounds`` chunks, every action
    of each chunk executed; ``policy``: a ``PipelinePolicy`` whose pipeline decodes its video. Returns
    the row's ``VIDEO_KEYS``: video_psnr, video_ssim (mean over episodes and rounds, dB / index), the
    references' video_{psnr,ssim}_hold and video_{psnr,ssim}_decoder, video_frames and video_rounds."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1 (chunks compared per episode), got {rounds}")
    if not policy.pipeline.decode_video:
        raise ValueError("measure_video needs a pipeline built with decode_video=True (the predicted frames)")
    images = np.stack([env.reset(i % env.num_layouts) for i, env in enumerate(envs)])
    policy.reset(text.expand(len(envs), -1, -1).contiguous())
    pipeline, scores = policy.pipeline, {}
    for _ in range(rounds):
        actions = policy.act(images).actions.float().numpy()
        predicted = policy.session.last_video[:, -1]  # the frame the model predicts after the chunk
        for i, env in enumerate(envs):
            for action in actions[i]:
                env.step(action, render=False)
        observed = np.stack([env.render() for env in envs])
        decoded = pipeline.frame_encoder.decode(pipeline.encode_images(torch.from_numpy(observed)))[:, 0]
        for suffix, frames in (("", predicted), ("_hold", images), ("_decoder", decoded)):
            for metric in (psnr, ssim):
                scores.setdefault(f"video_{metric.__name__}{suffix}", []).extend(metric(frames, observed).tolist())
        images = observed
    return {key: float(np.mean(values)) for key, values in scores.items()} | \
        {"video_frames": len(scores["video_psnr"]), "video_rounds": rounds}
