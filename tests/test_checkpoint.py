"""Checkpoints: safetensors + JSON config, exact round trip, atomic writes, no pickle."""
import json
import os

import pytest
import torch

import wam_fast
from model_inputs import random_inputs
from wam_fast.models import checkpoint


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact(tmp_path, dtype):
    cfg = wam_fast.configs.get("tiny", mask="temporal", history_frames=2, num_robots=2)
    model = wam_fast.WAMTransformer(cfg).to(dtype)
    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["checksums.json", "config.json", "model.safetensors"]
    loaded = wam_fast.WAMTransformer.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == cfg
    for (name, a), (name_b, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == name_b and a.dtype == b.dtype and torch.equal(a, b), name
    inputs = random_inputs(model, num_history=1)
    robot = torch.tensor([0, 1])
    for x, y in zip(model(**inputs, robot_id=robot), loaded(**inputs, robot_id=robot)):
        assert torch.equal(x, y)


def test_load_casts_dtype_and_config_json_is_readable(tmp_path):
    model = wam_fast.WAMTransformer(wam_fast.configs.get("tiny"))
    wam_fast.save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_layers"] == 2
    loaded = wam_fast.load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_weights_file_is_plain_safetensors_not_pickle(tmp_path):
    from safetensors import safe_open

    wam_fast.save_pretrained(wam_fast.WAMTransformer(wam_fast.configs.get("tiny")), tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])  # safetensors: 8-byte length + JSON header + raw data
    assert "blocks.0.adaln.weight" in header
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["config"])["name"] == "tiny"


def test_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    old = wam_fast.WAMTransformer(wam_fast.configs.get("tiny"))
    wam_fast.save_pretrained(old, tmp_path)
    new = wam_fast.WAMTransformer(wam_fast.configs.get("tiny"))

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        wam_fast.save_pretrained(new, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["checksums.json", "config.json", "model.safetensors"]  # no temp file
    monkeypatch.undo()
    loaded = wam_fast.load_pretrained(tmp_path)
    for a, b in zip(old.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_mismatched_config_and_weights_are_refused(tmp_path):
    wam_fast.save_pretrained(wam_fast.WAMTransformer(wam_fast.configs.get("tiny")), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config\.json does not match its checksum"):
        wam_fast.load_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not match the config stored"):  # caught without checksums too
        wam_fast.load_pretrained(tmp_path, verify=False)


def test_missing_files_and_foreign_safetensors_are_refused(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        wam_fast.load_pretrained(tmp_path)
    save_file({"w": torch.zeros(2)}, str(tmp_path / checkpoint.WEIGHTS_NAME))
    (tmp_path / checkpoint.CONFIG_NAME).write_text(json.dumps(wam_fast.configs.get("tiny").to_dict()))
    with pytest.raises(ValueError, match="not a wam_fast checkpoint"):
        wam_fast.load_pretrained(tmp_path)


def test_unknown_config_field_and_meta_model_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown WAMConfig fields"):
        wam_fast.WAMConfig.from_dict({"num_layers": 2, "bogus": 1})
    with torch.device("meta"):
        model = wam_fast.WAMTransformer(wam_fast.configs.get("tiny"))
    with pytest.raises(ValueError, match="meta device"):
        wam_fast.save_pretrained(model, tmp_path)


def test_atomic_write_leaves_the_mode_of_a_plain_write(tmp_path):
    old = os.umask(0o022)
    try:
        checkpoint.atomic_write(tmp_path / "new.json", lambda tmp: open(tmp, "w").write("{}"))
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
        os.chmod(tmp_path / "new.json", 0o640)
        checkpoint.atomic_write(tmp_path / "new.json", lambda tmp: open(tmp, "w").write("[]"))
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode
        assert (tmp_path / "new.json").read_text() == "[]"
    finally:
        os.umask(old)


def test_training_checkpoints_leave_the_modes_of_a_plain_write(tmp_path):
    from wam_fast.distill import train_state

    old = os.umask(0o022)
    try:
        directory = train_state.write_checkpoint(tmp_path, 3, {"model.safetensors": {"w": torch.ones(2)}},
                                                 {"format": train_state.FORMAT, "step": 3}, keep=2)
    finally:
        os.umask(old)
    assert directory.stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()} == {
        "model.safetensors": 0o644, train_state.STATE_NAME: 0o644}  # safetensors' own is 0o600
