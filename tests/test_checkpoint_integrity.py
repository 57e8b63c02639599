"""Checkpoints carry sha256 checksums, verified on load; crafted or torn files are refused fast, naming the path
(wam_fast.utils.checksums, wam_fast.models.checkpoint, wam_fast.quant.checkpoint; issue: hardening)."""
import json
import logging
import os
import time

import pytest
import torch

import wam_fast
from wam_fast import quant
from wam_fast.utils.checksums import CHECKSUMS_NAME


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = wam_fast.WAMTransformer(wam_fast.configs.get("tiny"))
    wam_fast.save_pretrained(model, tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # a tensor's last byte: still a valid safetensors file, different weights
    path.write_bytes(bytes(data))


def test_checksums_written_and_verified(saved):
    model, ckpt = saved
    hashes = json.loads((ckpt / CHECKSUMS_NAME).read_text())["sha256"]
    assert set(hashes) == {"model.safetensors", "config.json"} and all(len(h) == 64 for h in hashes.values())
    loaded = wam_fast.load_pretrained(ckpt)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))


def test_a_flipped_bit_is_refused_naming_the_file(saved):
    _, ckpt = saved
    flip_last_byte(ckpt / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors does not match its checksum"):
        wam_fast.load_pretrained(ckpt)
    wam_fast.load_pretrained(ckpt, verify=False)  # the caller's explicit choice: loads the changed weights


def test_quantized_checkpoint_is_verified(saved, tmp_path):
    model, _ = saved
    wam_fast.quantize_fp8(model, wam_fast.FP8Config())
    quant.save_quantized(model, tmp_path / "fp8")
    quant.load_quantized(tmp_path / "fp8")
    flip_last_byte(tmp_path / "fp8" / "model.safetensors")
    with pytest.raises(ValueError, match="does not match its checksum"):
        quant.load_quantized(tmp_path / "fp8")


def test_checkpoint_without_checksums_loads_and_says_so(saved, caplog):
    _, ckpt = saved
    os.remove(ckpt / CHECKSUMS_NAME)
    with caplog.at_level(logging.WARNING):
        wam_fast.load_pretrained(ckpt)
    assert any("not verified" in r.getMessage() for r in caplog.records)


def test_crafted_layer_count_is_refused_before_building(saved):
    """A small checkpoint whose config claims 100000 layers: refused from the header in well under a second."""
    from safetensors.torch import load_file, save_file

    _, ckpt = saved
    config = json.loads((ckpt / "config.json").read_text())
    config["num_layers"] = 100000
    text = json.dumps(config, indent=2, sort_keys=True)
    tensors = load_file(str(ckpt / "model.safetensors"))
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"wam_fast_format": "1", "config": text})
    (ckpt / "config.json").write_text(text + "\n")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="holds 2 transformer blocks but its config says num_layers=100000"):
        wam_fast.load_pretrained(ckpt, verify=False)
    assert time.perf_counter() - start < 1.0


def test_torn_files_name_the_path(saved):
    _, ckpt = saved
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="does not match its checksum"):
        wam_fast.load_pretrained(ckpt)
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        wam_fast.load_pretrained(ckpt, verify=False)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        wam_fast.load_pretrained(ckpt, verify=False)


# ---- one run per output directory (wam_fast.utils.run_lock) ---------------------------------------------------
def test_run_lock_refuses_a_second_run_and_takes_over_a_stale_one(tmp_path, caplog):
    import socket
    import subprocess
    import sys

    from wam_fast.utils.run_lock import LOCK_NAME, RunLockedError, run_lock

    with run_lock(tmp_path / "out") as lock:
        owner = json.loads(lock.read_text())
        assert owner["pid"] == os.getpid()
        with pytest.raises(RunLockedError, match=f"in use by another run \\(pid {os.getpid()} on"):
            with run_lock(tmp_path / "out"):
                pass
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # released
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "out" / LOCK_NAME).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                          "started": "earlier"}))
    with caplog.at_level(logging.WARNING), run_lock(tmp_path / "out"):
        pass
    assert any("no longer running" in r.getMessage() for r in caplog.records)
    (tmp_path / "out" / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-host", "started": "now"}))
    with pytest.raises(RunLockedError, match="another-host"):  # never assumed stale across hosts
        with run_lock(tmp_path / "out"):
            pass


def test_training_holds_the_lock(tmp_path):
    from wam_fast.distill import trainer
    from wam_fast.utils.run_lock import LOCK_NAME, RunLockedError

    import distill_worker as worker

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "another-host", "started": "now"}))
    config = trainer.TrainConfig(steps=2, batch_size=8, progress=False, tensorboard=False, device="cpu")
    with pytest.raises(RunLockedError, match="another-host"):
        trainer.train(worker.MLP(), worker.Regression(), worker.regression_dataset(), config, tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME]  # nothing written
