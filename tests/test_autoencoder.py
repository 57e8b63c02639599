"""The frozen autoencoder latent space of the Meta-World harness (wam_fast.eval.autoencoder)."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from wam_fast.eval import autoencoder as ae


def _dots(n: int, seed: int):
    """64x64 frames with a 3x3 red dot (as small as push-v3's puck); the 'action' is the dot's position."""
    generator = torch.Generator().manual_seed(seed)
    where = torch.randint(4, 60, (n, 2), generator=generator)
    images = torch.full((n, 1, 3, 64, 64), -0.5)
    for i, (y, x) in enumerate(where.tolist()):
        images[i, 0, 0, y - 1:y + 2, x - 1:x + 2] = 1.0
    target = (where.float() - 32) / 28
    actions = torch.cat([target, -target], 1)[:, None].repeat(1, 2, 1)
    return {"text": torch.zeros(n, 1, 4), "image": images, "future": images.flip(-1), "actions": actions}


def _train_config(steps: int):
    from wam_fast.distill.trainer import TrainConfig

    return TrainConfig(steps=steps, batch_size=32, lr=2e-3, warmup_steps=10, lr_schedule="cosine", ema_decay=0.5,
                       precision="fp32", log_every=10, checkpoint_every=50, progress=False, tensorboard=False,
                       device="cpu")  # the CPU whatever the machine: the same numbers everywhere


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from wam_fast.distill.data import write_dataset

    root = tmp_path_factory.mktemp("autoencoder")
    write_dataset(root / "dots", _dots(256, seed=0))
    frozen = ae.train_autoencoder(root / "dots", root / "ae", _train_config(300), channels=8, width=8, action_weight=10.0)
    return SimpleNamespace(root=root, frozen=frozen, model=ae.load_autoencoder(frozen))


def test_shapes_and_clear_errors():
    model = ae.FrameAutoencoder(ae.AutoencoderConfig(channels=8, width=16, action_len=3))
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = model.encode(pixels)
    assert latents.shape == (2, 8, 8, 8) and model.decode(latents).shape == (2, 3, 64, 64)
    reconstruction, actions = model(pixels)
    assert reconstruction.shape == (2, 3, 64, 64) and actions.shape == (2, 3, 4)
    with pytest.raises(ValueError, match=r"\(B, 3, 64, 64\).*got \(2, 3, 32, 32\)"):
        model.encode(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="image_size must be a multiple of 8, got 60"):
        ae.AutoencoderConfig(image_size=60)
    with pytest.raises(ValueError, match="channels must be a positive int, got 0"):
        ae.AutoencoderConfig(channels=0)
    with pytest.raises(FileNotFoundError, match="no autoencoder at"):
        ae.load_autoencoder("/nonexistent/frozen")


def test_latents_tell_where_a_small_object_is_on_unseen_frames(trained):
    """What the autoencoder is for: a 3x3 object's position survives the encoder, read through the mean over
    the latent cells (so every cell carries it), on frames it was not trained on."""
    held_out = _dots(128, seed=1)
    with torch.no_grad():
        _, predicted = trained.model(held_out["image"][:, 0])
    error = ((predicted - held_out["actions"]) ** 2).mean()
    assert error < 0.1 * held_out["actions"].var()  # the mean action's error would be 1x


def test_frozen_latents_are_normalised_and_training_resumes(trained):
    from wam_fast.distill.data import LatentDataset

    frames = LatentDataset(trained.root / "dots").get(torch.arange(256))["image"][:, 0]
    with torch.no_grad():
        latents = trained.model.encode(frames)
    assert latents.mean((0, 2, 3)).abs().max() < 1e-3 and (latents.std((0, 2, 3)) - 1).abs().max() < 1e-2
    assert not any(p.requires_grad for p in trained.model.parameters()) and not trained.model.training
    assert json.loads((trained.frozen / "config.json").read_text())["channels"] == 8
    before = (trained.frozen / "model.safetensors").read_bytes()
    again = ae.train_autoencoder(trained.root / "dots", trained.root / "ae", _train_config(300), channels=8, width=8,
                                 action_weight=10.0)
    assert again == trained.frozen and (again / "model.safetensors").read_bytes() == before  # resumed: same weights


def test_encode_demos_keeps_every_sample_and_encodes_each_frame(trained):
    from wam_fast.distill.data import LatentDataset

    encoded = LatentDataset(ae.encode_demos(trained.model, trained.root / "dots", trained.root / "latents"))
    pixels = LatentDataset(trained.root / "dots")
    rows = torch.tensor([0, 7, 255])
    got, source = encoded.get(rows), pixels.get(rows)
    assert len(encoded) == len(pixels) and got["image"].shape == (3, 1, 8, 8, 8)
    assert torch.equal(got["actions"], source["actions"]) and torch.equal(got["text"], source["text"])
    with torch.no_grad():
        assert torch.allclose(got["future"][:, 0], trained.model.encode(source["future"][:, 0].float()), atol=1e-5)
    assert encoded.metadata["latent_space"]["kind"] == "autoencoder"


def test_the_pipeline_encodes_frames_with_the_autoencoder(trained, tmp_path):
    """The harness's pixels -> actions path: uint8 frames -> [-1, 1] pixels -> the frozen autoencoder's
    normalised latents -> the WAM; saved and loaded as the registered frame encoder."""
    import wam_fast
    from wam_fast.eval import metaworld as mw
    from wam_fast.eval.pipeline_policy import AutoencoderFrameEncoder
    from wam_fast.pipeline import FixedTextEncoder, WAMPipeline

    encoder = AutoencoderFrameEncoder(trained.model)
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    assert encoder.latent_shape() == (8, 8, 8)
    config = wam_fast.configs.get("tiny", mask="temporal", latent_channels=8, latent_height=8, latent_width=8,
                                  text_len=4, text_dim=32, action_len=8, action_dim=4)
    model = wam_fast.WAMTransformer(config).eval()
    pipe = WAMPipeline(model, encoder, FixedTextEncoder({"push-v3": mw.instruction_embedding("push-v3", 4, 32)}))
    with torch.no_grad():
        assert torch.equal(pipe.encode_images(torch.from_numpy(images))[:, 0], trained.model.encode(pixels))
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = WAMPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(loaded.frame_encoder, AutoencoderFrameEncoder)
    np.testing.assert_allclose(loaded.new_session(seed=0).act_batch(images, "push-v3"),
                               pipe.new_session(seed=0).act_batch(images, "push-v3"), rtol=1e-5, atol=1e-5)
