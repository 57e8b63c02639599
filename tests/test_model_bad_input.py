"""Bad input to configs and WAMTransformer.forward: a clear error naming expected and got."""
import pytest
import torch

import wam_fast
from model_inputs import random_inputs


@pytest.fixture(scope="module")
def model():
    return wam_fast.WAMTransformer(wam_fast.configs.get("tiny"))


@pytest.fixture(scope="module")
def temporal_model():
    return wam_fast.WAMTransformer(wam_fast.configs.get("tiny", mask="temporal", history_frames=2))


def call(model, **changes):
    inputs = random_inputs(model)
    inputs.update(changes)
    return model(**inputs)


@pytest.mark.parametrize("name, shape, message", [
    ("video", (2, 3, 4, 8, 8), r"video must have shape \(2, 2, 4, 8, 8\), got \(2, 3, 4, 8, 8\)"),
    ("video", (2, 2, 5, 8, 8), r"video must have shape \(2, 2, 4, 8, 8\), got \(2, 2, 5, 8, 8\)"),
    ("video", (2, 4, 8, 8), r"video must be 5-D \(B, F, C, H, W\), got shape \(2, 4, 8, 8\)"),
    ("text", (2, 9, 32), r"text must have shape \(2, 8, 32\), got \(2, 9, 32\)"),
    ("text", (3, 8, 32), r"text must have shape \(2, 8, 32\), got \(3, 8, 32\)"),
    ("actions", (2, 4, 6), r"actions must have shape \(2, 4, 7\), got \(2, 4, 6\)"),
    ("image", (2, 2, 4, 8, 8), r"image must have shape \(2, 1, 4, 8, 8\), got \(2, 2, 4, 8, 8\)"),
])
def test_wrong_shapes(model, name, shape, message):
    with pytest.raises(ValueError, match=message):
        call(model, **{name: torch.randn(shape)})


def test_wrong_dtype(model):
    with pytest.raises(TypeError, match=r"text must have the model's dtype torch.float32, got torch.bfloat16"):
        call(model, text=torch.randn(2, 8, 32, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="actions must be a torch.Tensor, got list"):
        call(model, actions=[[0.0] * 7] * 4)


def test_wrong_device(model):
    with pytest.raises(ValueError, match=r"video is on meta but the model is on cpu"):
        call(model, video=torch.randn(2, 2, 4, 8, 8, device="meta"))


@pytest.mark.parametrize("timestep, error, message", [
    (torch.zeros(3), ValueError, r"timestep must have shape \(2,\) or \(2, 3\)"),
    (torch.zeros(2, 5), ValueError, r"timestep must have shape \(2,\) or \(2, 3\) for segments \('text', 'video', 'actions'\)"),
    (1500, ValueError, r"timestep must lie in \[0, 1000\], got 1500"),
    ("500", TypeError, "timestep must be a number or a tensor"),
    (torch.zeros(2, dtype=torch.bool), TypeError, "timestep must be a real number tensor"),
])
def test_wrong_timestep(model, timestep, error, message):
    with pytest.raises(error, match=message):
        call(model, timestep=timestep)


def test_scalar_timestep_is_accepted(model):
    video_out, _ = call(model, timestep=500)
    assert video_out.shape == (2, 2, 4, 8, 8)


def test_history_needs_the_temporal_layout_and_fits_the_window(model, temporal_model):
    with pytest.raises(ValueError, match="history frames need a model with mask='temporal'"):
        call(model, history=torch.randn(2, 1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"history must hold 1..2 frames \(config.history_frames\), got 3"):
        call(temporal_model, history=torch.randn(2, 3, 4, 8, 8))
    with pytest.raises(ValueError, match=r"video must have shape \(2, 1, 4, 8, 8\), got \(2, 2, 4, 8, 8\)"):
        call(temporal_model, video=torch.randn(2, 2, 4, 8, 8))  # temporal: future frames only


def test_temporal_model_without_image_has_no_current_segment(temporal_model):
    assert temporal_model.layout(has_image=False).names == ("text", "video", "actions")
    video_out, _ = call(temporal_model, image=None)
    assert video_out.shape == (2, 1, 4, 8, 8)


def test_robot_id_given_to_a_model_without_robots(model):
    with pytest.raises(ValueError, match=r"robot_id given but the model has no robot-id embedding"):
        call(model, robot_id=torch.tensor([0, 1]))


@pytest.mark.parametrize("overrides, message", [
    (dict(mask="causal"), r"WAMConfig.mask must be one of \('full', 'temporal'\), got 'causal'"),
    (dict(history_frames=2), "history_frames=2 needs mask='temporal'"),
    (dict(latent_height=9), "latent_height=9 is not divisible by patch_size=2"),
    (dict(rope_axes_dim=(4, 4, 4)), r"rope_axes_dim \(4, 4, 4\) must be three positive even sizes summing to head_dim=16"),
    (dict(num_layers=0), "WAMConfig.num_layers must be a positive int, got 0"),
    (dict(objective="eps"), "WAMConfig.objective must be one of"),
    (dict(mask="temporal", latent_frames=1), "latent_frames must be >= 2"),
    # types, signs and finiteness of the fields without a range check of their own
    (dict(norm_eps=float("nan")), "WAMConfig.norm_eps must be a finite number > 0, got nan"),
    (dict(qk_norm_eps=-1e-6), "WAMConfig.qk_norm_eps must be a finite number > 0, got -1e-06"),
    (dict(rope_theta=float("inf")), "WAMConfig.rope_theta must be a finite number > 0, got inf"),
    (dict(rope_theta="10000"), "WAMConfig.rope_theta must be a finite number > 0, got '10000'"),
    (dict(num_robots=-1), "WAMConfig.num_robots must be an int >= 0, got -1"),
    (dict(num_robots=1.5), "WAMConfig.num_robots must be an int >= 0, got 1.5"),
    (dict(history_frames=True), "WAMConfig.history_frames must be an int >= 0, got True"),
    (dict(image_concat=1), "WAMConfig.image_concat must be a bool, got 1"),
    (dict(mask=["full"]), r"WAMConfig.mask must be a str, got \['full'\]"),
    (dict(rope_axes_dim=(4, 6.0, 6)), r"WAMConfig.rope_axes_dim must be None or three ints \(t, h, w\)"),
    (dict(rope_axes_dim=(4, 12)), r"WAMConfig.rope_axes_dim must be None or three ints"),
    (dict(num_heads=2.0), "WAMConfig.num_heads must be a positive int, got 2.0"),
])
def test_bad_configs(overrides, message):
    with pytest.raises(ValueError, match=message):
        wam_fast.configs.get("tiny", **overrides)


def test_config_name_must_be_a_str():
    with pytest.raises(ValueError, match="WAMConfig.name must be a str, got None"):
        wam_fast.WAMConfig(name=None)


def test_config_numbers_are_normalised():
    cfg = wam_fast.configs.get("tiny", rope_theta=500, rope_axes_dim=[4, 6, 6])  # as JSON or by hand
    assert cfg.rope_theta == 500.0 and isinstance(cfg.rope_theta, float) and cfg.rope_axes_dim == (4, 6, 6)
    assert wam_fast.WAMConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_preset_and_non_config():
    with pytest.raises(ValueError, match=r"unknown workload 'videovla-9b'; expected one of \('tiny', 'videovla-5b', 'videovla-5b-sim'\)"):
        wam_fast.configs.get("videovla-9b")
    with pytest.raises(TypeError, match="WAMTransformer expects a WAMConfig, got dict"):
        wam_fast.WAMTransformer({"num_layers": 2})


def test_bad_layouts(model, temporal_model):
    with pytest.raises(ValueError, match="history frames need mask='temporal'"):
        model.layout(num_history=1)
    with pytest.raises(ValueError, match=r"num_history must be in \[0, 2\] \(config.history_frames\), got 3"):
        temporal_model.layout(num_history=3)


def test_attention_reference_refuses_unknown_masks_and_missing_segments():
    from wam_fast.ops import reference as WF

    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="mask must be 'full' or 'temporal', got 'causal'"):
        WF.attention(q, q, q, mask="causal")
    with pytest.raises(ValueError, match=r"mask='temporal' needs q_segments and k_segments"):
        WF.attention(q, q, q, mask="temporal")
