"""wam_fast.WAMPipeline: pixels + instruction -> actions in robot units, on tiny random parts built here."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

import wam_fast  # noqa: E402
from wam_fast.pipeline import FixedTextEncoder, PixelsEncoder, WAMPipeline  # noqa: E402
from wam_fast.pipeline import pipeline as pipeline_module  # noqa: E402

INSTRUCTION, OTHER = "open the drawer", "push the puck to the goal"


@pytest.fixture(scope="module")
def pipe():
    return WAMPipeline.tiny_random(seed=0)


def frame(seed=0, shape=(32, 32, 3)):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def like(pipe, **options):
    """Another pipeline over the same parts (weights shared), with other options."""
    return WAMPipeline(pipe.model, pipe.frame_encoder, pipe.text_encoder, **options)


def manual_actions(pipe, seed, calls):
    """The path by hand: T5, the VAE's posterior mean x scaling_factor, WAMPolicy.reset / act."""
    policy = wam_fast.WAMPolicy(pipe.model, cache=True, seed=seed)
    vae, t5 = pipe.frame_encoder.vae, pipe.text_encoder
    out, last = [], None
    for image, instruction in calls:
        tokens = t5.tokenizer([instruction], padding="max_length", max_length=8, truncation=True, return_tensors="pt")
        text = t5.model(input_ids=tokens["input_ids"]).last_hidden_state
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            latent = vae.encode(pixels[:, :, None]).latent_dist.mean * vae.config.scaling_factor
        if instruction != last:
            policy.reset(text)
            last = instruction
        out.append(policy.act(latent.movedim(2, 1)).actions[0].numpy())
    return out


def test_round_trip_shapes_and_dtypes(pipe):
    session = pipe.new_session(seed=0)
    actions = session(frame(), INSTRUCTION)
    assert actions.shape == (4, 7) and actions.dtype == np.float32 and np.isfinite(actions).all()
    assert set(session.last_timing) == {"text_ms", "encode_ms", "policy_ms", "total_ms"}
    assert all(v >= 0 for v in session.last_timing.values())
    meta = pipe.metadata()
    assert json.loads(json.dumps(meta)) == meta
    assert meta["image_shape"] == [32, 32, 3] and meta["action_shape"] == [4, 7] and meta["state"] is False
    assert (meta["image_key"], meta["prompt_key"], meta["max_cameras"], meta["image_dtype"]) == \
        ("image", "prompt", 1, "uint8")


def test_numpy_torch_one_camera_and_float_inputs_agree(pipe):
    image = frame(1)
    inputs = [image, torch.from_numpy(image), image[None], image.astype(np.float32)]
    results = [pipe.new_session(seed=3)(x, INSTRUCTION) for x in inputs]
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


def test_pipeline_equals_the_manual_path(pipe):
    calls = [(frame(0), INSTRUCTION), (frame(1), INSTRUCTION), (frame(2), OTHER), (frame(3), OTHER)]
    session = pipe.new_session(seed=5)
    got = [session(image, instruction) for image, instruction in calls]
    for a, b in zip(got, manual_actions(pipe, 5, calls)):
        np.testing.assert_array_equal(a, b)


def test_text_encoder_runs_once_per_instruction(pipe, monkeypatch):
    pipe = like(pipe)
    calls = []
    encode = pipe.text_encoder.encode
    monkeypatch.setattr(pipe.text_encoder, "encode", lambda text: calls.append(text) or encode(text))
    a, b = pipe.new_session(seed=0), pipe.new_session(seed=1)
    for _ in range(3):
        a(frame(), INSTRUCTION)
        b(frame(), INSTRUCTION)
    b(frame(), OTHER)
    assert calls == [INSTRUCTION, OTHER]
    assert a.last_timing["text_ms"] < 5


def test_text_cache_is_bounded(pipe, monkeypatch):
    pipe = like(pipe)
    monkeypatch.setattr(pipeline_module, "TEXT_CACHE_SIZE", 2)
    for instruction in ("open", "close", "push", "open"):
        pipe.text_embedding(instruction)
    assert list(pipe.text_cache) == ["push", "open"]


def test_new_instruction_starts_a_new_episode(pipe):
    session = pipe.new_session(seed=0)
    session(frame(0), INSTRUCTION)
    session(frame(1), INSTRUCTION)
    assert session.policy.step == 2  # same instruction: the episode (KV cache of past frames) continues
    text_before = session.policy.text
    session(frame(2), OTHER)
    assert session.policy.step == 1 and not torch.equal(session.policy.text, text_before)
    session.reset()
    session(frame(3), OTHER)
    assert session.policy.step == 1  # reset: a new episode even with the same instruction


def test_sessions_are_independent(pipe):
    plan_a = [(frame(0), INSTRUCTION), (frame(1), INSTRUCTION), (frame(2), INSTRUCTION)]
    plan_b = [(frame(5), OTHER), (frame(6), OTHER), (frame(7), INSTRUCTION)]
    alone_a = [c for s in [pipe.new_session(seed=1)] for c in (s(*x) for x in plan_a)]
    alone_b = [c for s in [pipe.new_session(seed=2)] for c in (s(*x) for x in plan_b)]
    a, b = pipe.new_session(seed=1), pipe.new_session(seed=2)
    for (xa, xb), ra, rb in zip(zip(plan_a, plan_b), alone_a, alone_b):
        np.testing.assert_array_equal(b(*xb), rb)
        np.testing.assert_array_equal(a(*xa), ra)


def test_actions_are_denormalized(pipe):
    mean, std = np.arange(7, dtype=np.float32), np.linspace(0.5, 2.0, 7, dtype=np.float32)
    raw = like(pipe).new_session(seed=4)(frame(), INSTRUCTION)
    normalized = like(pipe, normalization={"mean": mean.tolist(), "std": std.tolist()})
    robot = normalized.new_session(seed=4)(frame(), INSTRUCTION)
    np.testing.assert_allclose(robot, raw * std + mean, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="7 finite numbers"):
        like(pipe, normalization={"mean": [0.0] * 3, "std": [1.0] * 3})


def test_a_committed_prefix_comes_back_exactly_and_the_rest_continues_it(pipe):
    mean, std = np.arange(7, dtype=np.float32), np.linspace(0.5, 2.0, 7, dtype=np.float32)
    normalized = like(pipe, normalization={"mean": mean.tolist(), "std": std.tolist()})
    committed = np.random.default_rng(1).normal(size=(3, 7)).astype(np.float32) * std + mean
    actions = normalized.new_session(seed=4)(frame(), INSTRUCTION, prefix=committed)
    np.testing.assert_array_equal(actions[:3], committed)  # robot units, not their trip through the statistics
    plain = normalized.new_session(seed=4)(frame(), INSTRUCTION)
    assert np.abs(actions[3:] - plain[3:]).max() > 1e-4  # the rest was sampled knowing the prefix
    np.testing.assert_array_equal(normalized.new_session(seed=4)(frame(), INSTRUCTION, prefix=committed[:0]), plain)
    batch = normalized.new_session(seed=4).act_batch(np.stack([frame(), frame(1)]), INSTRUCTION,
                                                     np.stack([committed[:2], -committed[:2]]))
    np.testing.assert_array_equal(batch[:, :2], np.stack([committed[:2], -committed[:2]]))
    assert normalized.metadata()["max_prefix"] == 3  # up to action_len - 1
    unblended = normalized.new_session(seed=4)(frame(), INSTRUCTION, prefix=committed, blend=0)
    np.testing.assert_array_equal(unblended[:3], committed)
    assert np.abs(unblended[3:] - actions[3:]).max() > 1e-4  # the blend is a choice


@pytest.mark.parametrize("prefix,error,message", [
    (np.zeros((4, 7), np.float32), ValueError, "0 <= d < 4"),
    (np.zeros((2, 6), np.float32), ValueError, "\\(1, d, 7\\)"),
    (np.zeros((2, 7), np.int32), TypeError, "float actions"),
    (np.full((2, 7), np.nan, np.float32), ValueError, "non-finite"),
    ("fast", TypeError, "numpy array or torch tensor"),
])
def test_a_bad_prefix_is_refused(pipe, prefix, error, message):
    with pytest.raises(error, match=message):
        like(pipe).new_session(seed=0)(frame(), INSTRUCTION, prefix=prefix)


def test_default_session_and_state_refused(pipe):
    pipe = like(pipe)
    assert pipe(frame(), INSTRUCTION).shape == (4, 7)
    with pytest.raises(ValueError, match="no proprioceptive state"):
        pipe(frame(), INSTRUCTION, state=np.zeros(7, np.float32))


@pytest.mark.parametrize("images, instruction, error, words", [
    (frame().astype(np.int32), INSTRUCTION, TypeError, ["uint8", "int32"]),
    (frame(shape=(16, 16, 3)), INSTRUCTION, ValueError, ["(32, 32, 3)", "(16, 16, 3)"]),
    (frame(shape=(32, 32, 4)), INSTRUCTION, ValueError, ["(32, 32, 3)", "(32, 32, 4)"]),
    (frame(shape=(2, 32, 32, 3)), INSTRUCTION, ValueError, ["1 camera", "got 2"]),
    (np.full((32, 32, 3), np.nan, np.float32), INSTRUCTION, ValueError, ["non-finite"]),
    (np.full((32, 32, 3), 300.0, np.float32), INSTRUCTION, ValueError, ["[0, 255]", "300"]),
    ([[0, 1, 2]], INSTRUCTION, TypeError, ["numpy array or torch tensor", "list"]),
    (frame(), "", ValueError, ["non-empty", "''"]),
    (frame(), "   ", ValueError, ["non-empty"]),
    (frame(), 7, TypeError, ["str", "int"]),
])
def test_bad_input_is_refused_with_a_clear_message(pipe, images, instruction, error, words):
    session = pipe.new_session(seed=0)
    with pytest.raises(error) as info:
        session(images, instruction)
    for word in words:
        assert word in str(info.value)
    assert session.policy.step == 0  # nothing ran


def test_parts_that_do_not_fit_are_refused(pipe):
    text = FixedTextEncoder({INSTRUCTION: torch.zeros(8, 16)})
    with pytest.raises(ValueError, match="d_model.* 16 .*text_dim 32"):
        WAMPipeline(pipe.model, pipe.frame_encoder, text)
    with pytest.raises(ValueError, match=r"\(3, 32, 32\).*\(4, 16, 16\)"):
        WAMPipeline(pipe.model, PixelsEncoder((32, 32)), pipe.text_encoder)
    with pytest.raises(TypeError, match="FrameEncoder"):
        WAMPipeline(pipe.model, pipe.frame_encoder.vae, pipe.text_encoder)


def test_save_and_load_give_identical_actions(pipe, tmp_path):
    pipe = like(pipe, normalization={"mean": [0.5] * 7, "std": [2.0] * 7})
    pipe.save_pretrained(tmp_path / "pipe")
    files = sorted(str(p.relative_to(tmp_path / "pipe")) for p in (tmp_path / "pipe").rglob("*") if p.is_file())
    assert all(f.endswith((".json", ".safetensors")) for f in files), files  # no pickle
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "normalization.json", "pipeline.json"):
        assert (tmp_path / "pipe" / part).exists()
    loaded = WAMPipeline.from_pretrained(tmp_path / "pipe")
    for mine, theirs in ((pipe.model, loaded.model), (pipe.frame_encoder.vae, loaded.frame_encoder.vae),
                         (pipe.text_encoder.model, loaded.text_encoder.model)):
        assert mine.state_dict().keys() == theirs.state_dict().keys()
        assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in mine.state_dict().items())
    calls = [(frame(0), INSTRUCTION), (frame(1), INSTRUCTION), (frame(2), OTHER)]
    a, b = pipe.new_session(seed=9), loaded.new_session(seed=9)
    for call in calls:
        # identical weights; the actions agree to float rounding only, as the loaded tensors sit at other
        # memory alignments and CPU matmuls take other SIMD paths (1e-7 differences)
        np.testing.assert_allclose(a(*call), b(*call), rtol=1e-5, atol=1e-5)
    assert loaded.metadata() == pipe.metadata()
    pipe.save_pretrained(tmp_path / "pipe")  # replacing a saved pipeline works
    assert sorted(os.listdir(tmp_path)) == ["pipe"]


def test_a_failed_save_leaves_nothing(pipe, tmp_path, monkeypatch):
    pipe = like(pipe)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pipe.text_encoder, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(tmp_path / "pipe")
    assert os.listdir(tmp_path) == []
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a saved pipeline"):
        like(pipe).save_pretrained(tmp_path / "other")


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved") / "pipe"
    pipe.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("part, error", [("vae", FileNotFoundError), ("transformer", FileNotFoundError),
                                         ("text_encoder", FileNotFoundError), ("tokenizer", FileNotFoundError),
                                         ("pipeline.json", FileNotFoundError)])
def test_a_missing_part_is_named(saved, tmp_path, part, error):
    import shutil

    copy = tmp_path / "pipe"
    shutil.copytree(saved, copy)
    target = copy / part
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(error) as info:
        WAMPipeline.from_pretrained(copy)
    assert repr(part) in str(info.value) and str(target) in str(info.value)


@pytest.mark.parametrize("part, file", [("transformer", "model.safetensors"), ("vae", "config.json"),
                                        ("text_encoder", "model.safetensors")])
def test_a_corrupt_part_is_named(saved, tmp_path, part, file):
    import shutil

    copy = tmp_path / "pipe"
    shutil.copytree(saved, copy)
    (copy / part / file).write_bytes(b"garbage")
    with pytest.raises(ValueError) as info:
        WAMPipeline.from_pretrained(copy)
    assert repr(part) in str(info.value) and str(copy / part) in str(info.value)


def test_fixed_embeddings_and_pixels_encoder(tmp_path):
    config = wam_fast.configs.get("tiny", mask="temporal", latent_channels=3, latent_height=16, latent_width=16,
                                  patch_size=4, text_len=4, text_dim=32)
    model = wam_fast.WAMTransformer(config).eval()
    embeddings = {INSTRUCTION: torch.randn(4, 32), OTHER: torch.randn(4, 32)}
    pipe = WAMPipeline(model, PixelsEncoder((16, 16)), FixedTextEncoder(embeddings))
    image = frame(shape=(16, 16, 3))
    actions = pipe.new_session(seed=0)(image, OTHER)
    policy = wam_fast.WAMPolicy(model, seed=0)
    policy.reset(embeddings[OTHER][None])
    latent = torch.from_numpy(image).permute(2, 0, 1)[None, None].float() / 127.5 - 1
    np.testing.assert_array_equal(actions, policy.act(latent).actions[0].numpy())
    with pytest.raises(ValueError, match="no fixed embedding"):
        pipe.new_session()(image, "close the door")
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "frame_encoder").is_dir() and not (tmp_path / "pipe" / "tokenizer").exists()
    loaded = WAMPipeline.from_pretrained(tmp_path / "pipe")
    np.testing.assert_allclose(loaded.new_session(seed=0)(image, OTHER), actions, rtol=1e-5, atol=1e-5)


def test_bf16_pipeline(saved):
    pipe = WAMPipeline.from_pretrained(saved, dtype=torch.bfloat16)
    assert pipe.frame_encoder.vae.dtype == torch.bfloat16 and pipe.text_encoder.model.dtype == torch.bfloat16
    actions = pipe.new_session(seed=0)(frame(), INSTRUCTION)
    assert actions.dtype == np.float32 and np.isfinite(actions).all()
    assert pipe.text_embedding(INSTRUCTION).dtype == torch.bfloat16
    assert pipe.encode_images(torch.from_numpy(frame())[None]).dtype == torch.bfloat16


def test_video_decode_is_optional(pipe):
    session = pipe.new_session(seed=0)
    session(frame(), INSTRUCTION)
    assert session.last_video is None  # off by default
    decoding = like(pipe, decode_video=True).new_session(seed=0)
    decoding(frame(), INSTRUCTION)
    assert decoding.last_video.dtype == np.uint8 and decoding.last_video.shape[-3:] == (32, 32, 3)


def test_a_batch_of_episodes(pipe):
    images = np.stack([frame(1), frame(2)])
    batched = pipe.new_session(seed=0)
    first = batched.act_batch(images, INSTRUCTION)
    assert first.shape == (2, 4, 7) and batched.policy.batch == 2
    second = batched.act_batch(images[::-1].copy(), INSTRUCTION)
    assert second.shape == (2, 4, 7) and batched.policy.step == 2
    with pytest.raises(ValueError, match="episode runs 2 rows, got a batch of 3"):
        batched.act_batch(np.stack([frame(1)] * 3), INSTRUCTION)
    with pytest.raises(ValueError, match=r"\(B, 32, 32, 3\), got \(32, 32, 3\)"):
        batched.act_batch(frame(1), INSTRUCTION)
    batched.reset()
    assert batched.act_batch(np.stack([frame(1)] * 3), INSTRUCTION).shape == (3, 4, 7)  # reset: a new batch size


def test_import_works_without_transformers():
    code = ("import sys; sys.modules['transformers'] = None; sys.modules['diffusers'] = None\n"
            "import wam_fast, wam_fast.pipeline\n"
            "assert wam_fast.WAMPipeline is wam_fast.pipeline.WAMPipeline\n"
            "try:\n    wam_fast.WAMPipeline.tiny_random()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'pip install "wam_fast[pipeline]"' in out.stdout
