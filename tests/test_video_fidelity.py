"""Video fidelity of the Meta-World rows (wam_fast.eval.video_fidelity): PSNR, SSIM, the closed-loop pass."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wam_fast.eval import video_fidelity as vf
from wam_fast.pipeline import PixelsEncoder
from wam_fast.pipeline.encoders import images_from_pixels, pixels_from_images


def _images(seed: int, shape=(2, 24, 20, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM written out window by window, in float64: the definition the fast one must match."""
    g = np.exp(-(np.arange(11) - 5.0) ** 2 / (2 * 1.5 ** 2))
    w = np.outer(g / g.sum(), g / g.sum())
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    x, y = x.astype(np.float64), y.astype(np.float64)
    values = []
    for c in range(3):
        for i in range(x.shape[0] - 10):
            for j in range(x.shape[1] - 10):
                a, b = x[i:i + 11, j:j + 11, c], y[i:i + 11, j:j + 11, c]
                ma, mb = (w * a).sum(), (w * b).sum()
                va, vb = (w * a * a).sum() - ma * ma, (w * b * b).sum() - mb * mb
                cov = (w * a * b).sum() - ma * mb
                values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma * ma + mb * mb + c1) * (va + vb + c2)))
    return float(np.mean(values))


def test_psnr_known_values():
    a = np.full((1, 16, 16, 3), 100, np.uint8)
    assert vf.psnr(a, a + 10)[0] == pytest.approx(20 * math.log10(255 / 10))
    assert vf.psnr(a, a)[0] == vf.PSNR_MAX  # equal frames: the cap, not inf (JSON has no inf)
    x, y = _images(0), _images(1)
    mse = ((x.astype(float) - y) ** 2).reshape(2, -1).mean(1)
    assert np.allclose(vf.psnr(x, y), 10 * np.log10(255 ** 2 / mse))


@pytest.mark.parametrize("shape", [(1, 11, 11, 3), (2, 24, 20, 3), (1, 31, 17, 3)])
def test_ssim_matches_the_window_by_window_definition(shape):
    x = _images(2, shape)
    y = np.clip(x.astype(int) + np.random.default_rng(3).integers(-40, 40, size=shape), 0, 255).astype(np.uint8)
    fast = vf.ssim(x, y)
    assert fast.shape == shape[:1]
    for k in range(shape[0]):
        assert fast[k] == pytest.approx(_ssim_reference(x[k], y[k]), abs=1e-9)


def test_ssim_is_one_for_equal_frames_symmetric_and_falls_with_noise():
    x = _images(4, (1, 32, 32, 3))
    assert vf.ssim(x, x)[0] == pytest.approx(1.0)
    noisy = [np.clip(x.astype(int) + np.random.default_rng(5).normal(0, s, x.shape), 0, 255).astype(np.uint8)
             for s in (5, 20, 60)]
    scores = [vf.ssim(x, n)[0] for n in noisy]
    assert scores[0] > scores[1] > scores[2]
    assert vf.ssim(noisy[1], x)[0] == pytest.approx(scores[1])


def test_bad_frames_are_refused_with_what_came():
    x = _images(0)
    with pytest.raises(ValueError, match="predicted must be uint8 RGB images.*float32"):
        vf.psnr(x.astype(np.float32), x)
    with pytest.raises(ValueError, match=r"differ in shape: \(2, 24, 20, 3\) vs \(1, 24, 20, 3\)"):
        vf.ssim(x, x[:1])
    with pytest.raises(ValueError, match=r"at least 11x11 pixels, got \(8, 8\)"):
        vf.ssim(x[:, :8, :8], x[:, :8, :8])


def test_pixels_encoder_decodes_what_it_encodes():
    images = torch.from_numpy(_images(6, (3, 16, 16, 3)))
    latents = PixelsEncoder((16, 16)).encode(pixels_from_images(images, torch.float32, "cpu"))
    decoded = PixelsEncoder((16, 16)).decode(latents[:, None])
    assert decoded.shape == (3, 1, 16, 16, 3) and decoded.dtype == np.uint8
    assert np.array_equal(decoded[:, 0], images.numpy())
    assert np.array_equal(images_from_pixels(torch.full((1, 3, 2, 2), 5.0)), np.full((1, 2, 2, 3), 255, np.uint8))


class _Env:
    """A stand-in for MetaWorldEnv: the frame is a pure function of the position (moved by actions)."""

    num_layouts = 50

    def __init__(self):
        self.position = 0.0

    def reset(self, layout):
        self.position = float(layout)
        return self.render()

    def step(self, action, render=False):
        self.position += float(action[0])
        return None, False

    def render(self):
        image = np.zeros((16, 16, 3), np.uint8)
        image[:, :, 0] = int(self.position * 7) % 256
        image[4:8, 4:8, 1] = 200
        return image


class _Policy:
    """Moves by 1 per action; ``predict``: "truth" (the frame after the chunk), "current" or "black"."""

    def __init__(self, predict: str, chunk: int = 4, decoder_gain: float = 1.0):
        self.predict, self.chunk = predict, chunk
        # the frame encoder's round trip: exact (pixels), or one that dims the frame (a lossy autoencoder)
        decode = (lambda latents: (latents.float() * decoder_gain).round().to(torch.uint8).numpy())
        self.pipeline = SimpleNamespace(decode_video=True, encode_images=lambda images: images[:, None],
                                        frame_encoder=SimpleNamespace(decode=decode))
        self.session = SimpleNamespace(last_video=None)

    def reset(self, text):
        self.batch = text.shape[0]

    def act(self, images):
        truth = []
        for image in images:
            env = _Env()
            env.position = float(image[0, 0, 0]) / 7 + self.chunk  # (no wrap at these positions)
            truth.append(env.render())
        predicted = {"truth": np.stack(truth), "current": images, "black": np.zeros_like(images)}[self.predict]
        self.session.last_video = np.stack([images, predicted], 1)  # (B, F, H, W, 3): the last is after the chunk
        return SimpleNamespace(actions=torch.ones(len(images), self.chunk, 4))


def test_measure_video_compares_the_frame_after_the_whole_chunk():
    text = torch.zeros(4, 8)
    envs = [_Env() for _ in range(3)]
    truth = vf.measure_video(_Policy("truth"), envs, text, rounds=2)
    assert truth["video_psnr"] == vf.PSNR_MAX and truth["video_ssim"] == pytest.approx(1.0)
    assert truth["video_frames"] == 6 and truth["video_rounds"] == 2
    assert truth["video_psnr_hold"] < 40  # the scene moved: holding the current frame is not the truth
    held = vf.measure_video(_Policy("current"), envs, text, rounds=2)
    assert held["video_psnr"] == pytest.approx(held["video_psnr_hold"]) == pytest.approx(truth["video_psnr_hold"])
    black = vf.measure_video(_Policy("black"), envs, text, rounds=2)
    assert black["video_psnr"] < held["video_psnr"] and black["video_ssim"] < held["video_ssim"]
    assert set(truth) == set(vf.VIDEO_KEYS)
    assert truth["video_psnr_decoder"] == vf.PSNR_MAX and truth["video_ssim_decoder"] == pytest.approx(1.0)
    lossy = vf.measure_video(_Policy("truth", decoder_gain=0.5), envs, text, rounds=2)
    assert lossy["video_psnr_decoder"] < 30 and lossy["video_psnr"] == vf.PSNR_MAX  # the prediction is not decoded


def test_measure_video_refuses_a_pipeline_without_its_decode():
    policy = _Policy("truth")
    policy.pipeline.decode_video = False
    with pytest.raises(ValueError, match="decode_video=True"):
        vf.measure_video(policy, [_Env()], torch.zeros(1, 8), rounds=1)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        vf.measure_video(_Policy("truth"), [_Env()], torch.zeros(1, 8), rounds=0)
