"""The on-disk latent dataset (wam_fast.distill.data): format round trip, bad inputs and files, overwrite
safety, the synthetic task's structure, and teacher rollout (targets from the teacher, batch-size
independent, full vs temporal frame handling)."""
import json
import os
import pickle

import pytest
import torch

import wam_fast
from wam_fast.distill import data as D
from wam_fast.distill.data import DatasetWriter, LatentDataset, row_seed, write_dataset
from wam_fast.distill.rollout import teacher_rollout
from wam_fast.distill.synthetic import make_synthetic_dataset, synthetic_task


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models on a shared 2-core machine: one thread is several times faster than two
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_config(**overrides):
    # "tiny" with 4x4 latents, 2 text tokens and 1 layer: sampling takes milliseconds
    base = dict(text_len=2, latent_height=4, latent_width=4, num_layers=1)
    return wam_fast.configs.get("tiny", **{**base, **overrides})


def random_tensors(n, config=None, history=2, robots=3, generator=None):
    c = config or small_config()
    g = generator or torch.Generator().manual_seed(n)
    frame = (c.latent_channels, c.latent_height, c.latent_width)
    tensors = {
        "text": torch.randn((n, c.text_len, c.text_dim), generator=g).to(torch.bfloat16),
        "image": torch.randn((n, 1) + frame, generator=g),
        "future": torch.randn((n, c.latent_frames - 1) + frame, generator=g),
        "actions": torch.randn((n, c.action_len, c.action_dim), generator=g),
    }
    if history:
        tensors["history"] = torch.randn((n, history) + frame, generator=g)
    if robots:
        tensors["robot_id"] = torch.randint(robots, (n,), generator=g)
    return tensors


def assert_rows_equal(got, tensors, rows):
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype, name
        assert torch.equal(got[name], t[rows]), name


# ---- format round trip -----------------------------------------------------------------------------
def test_round_trip_awkward_shards(tmp_path):
    tensors = random_tensors(37)
    path = write_dataset(tmp_path / "ds", tensors, shard_size=16, metadata={"source": "test"})
    assert path == tmp_path / "ds"
    index = json.loads((path / "dataset.json").read_text())
    assert index["format"] == "wam_fast.latents" and index["version"] == 1 and index["num_samples"] == 37
    assert [s["num_samples"] for s in index["shards"]] == [16, 16, 5]
    assert [s["file"] for s in index["shards"]] == [f"shard-0000{k}.safetensors" for k in range(3)]
    assert index["fields"]["text"] == {"shape": [2, 32], "dtype": "bfloat16"}
    assert index["fields"]["robot_id"]["max"] == int(tensors["robot_id"].max())
    assert index["metadata"] == {"source": "test"}

    ds = LatentDataset(path, verify=True)
    assert len(ds) == 37 and ds.num_shards == 3 and ds.has_targets
    assert ds.fields["history"] == D.Field((2, 4, 4, 4), torch.float32)
    assert_rows_equal(ds.get(torch.arange(37)), tensors, torch.arange(37))
    # any order, repeats, across shard borders, int32 indices, a python list
    rows = torch.tensor([36, 0, 15, 16, 16, 31, 32, 0, 20, 36])
    assert_rows_equal(ds.get(rows.to(torch.int32)), tensors, rows)
    assert_rows_equal(ds.get(rows.tolist()), tensors, rows)
    shuffled = torch.randperm(37, generator=torch.Generator().manual_seed(0))
    assert_rows_equal(ds.get(shuffled), tensors, shuffled)
    assert_rows_equal(ds.get(torch.tensor([20, 17, 30, 3, 1])), tensors, torch.tensor([20, 17, 30, 3, 1]))
    sample = ds[17]
    assert torch.equal(sample["actions"], tensors["actions"][17]) and sample["robot_id"].dim() == 0
    assert torch.equal(ds[-1]["image"], tensors["image"][36])
    empty = ds.get(torch.tensor([], dtype=torch.long))
    assert empty["future"].shape == (0, 1, 4, 4, 4)
    # picklable (DataLoader workers) and still reading after
    clone = pickle.loads(pickle.dumps(ds))
    assert_rows_equal(clone.get(rows), tensors, rows)


def test_conditions_only_dataset_and_streaming_writer(tmp_path):
    tensors = random_tensors(10, history=0, robots=0)
    del tensors["future"], tensors["actions"]
    with DatasetWriter(tmp_path / "cond", shard_size=4) as writer:
        for start in (0, 3, 4, 9):  # uneven pieces
            stop = {0: 3, 3: 4, 4: 9, 9: 10}[start]
            writer.add({k: v[start:stop] for k, v in tensors.items()})
    ds = LatentDataset(tmp_path / "cond")
    assert not ds.has_targets and len(ds) == 10 and ds.num_shards == 3
    assert_rows_equal(ds.get(torch.arange(10)), tensors, torch.arange(10))


def test_get_rejects_bad_indices(tmp_path):
    ds = LatentDataset(write_dataset(tmp_path / "ds", random_tensors(5), shard_size=2))
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        ds.get(torch.tensor([0, 5]))
    with pytest.raises(IndexError, match=r"\[0, 5\)"):
        ds.get(torch.tensor([-1]))
    with pytest.raises(TypeError, match="1-D integer"):
        ds.get(torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="1-D integer"):
        ds.get(torch.tensor([[0, 1]]))
    with pytest.raises(IndexError, match="out of range"):
        ds[5]


# ---- bad inputs to write ---------------------------------------------------------------------------
def _without(name):
    def edit(t):
        del t[name]
    return edit


def _set(name, make):
    def edit(t):
        t[name] = make(t)
    return edit


def _nan(t):
    t["future"][3, 0, 0, 0, 0] = float("nan")


BAD_INPUTS = [
    (_without("image"), ValueError, r"missing required fields \['image'\]"),
    (_without("actions"), ValueError, "'future' without 'actions'"),
    (_set("depth", lambda t: t["image"]), ValueError, r"unknown fields \['depth'\]"),
    (_set("actions", lambda t: t["actions"][:6]), ValueError, "same number of samples.*actions has 6"),
    (_set("text", lambda t: t["text"][:, 0]), ValueError, r"text must be 3-D \(N, \*\(text_len, text_dim\)\)"),
    (_set("image", lambda t: t["image"].repeat(1, 2, 1, 1, 1)), ValueError, r"image must be \(N, 1, C, H, W\)"),
    (_set("future", lambda t: t["future"][..., :2]), ValueError, r"future frames must have the image's"),
    (_set("history", lambda t: t["history"][:, :, :3]), ValueError, r"history frames must have the image's"),
    (_nan, ValueError, r"future holds NaN or inf values \(in 1 of 7 samples\)"),
    (_set("robot_id", lambda t: t["robot_id"].int()), TypeError, "robot_id must be int64.*int32"),
    (_set("robot_id", lambda t: t["robot_id"] - 5), ValueError, "robot_id must be >= 0"),
    (_set("actions", lambda t: t["actions"].double()), TypeError, "actions must be float32, bfloat16 or float16"),
    (_set("text", lambda t: t["text"].tolist()), TypeError, "text must be a torch.Tensor"),
]


@pytest.mark.parametrize("edit, error, message", BAD_INPUTS, ids=[m for _, _, m in BAD_INPUTS])
def test_write_rejects_bad_inputs_and_writes_nothing(tmp_path, edit, error, message):
    tensors = random_tensors(7)
    edit(tensors)
    with pytest.raises(error, match=message):
        write_dataset(tmp_path / "ds", tensors, shard_size=3)
    assert not (tmp_path / "ds").exists()


def test_write_rejects_bad_arguments(tmp_path):
    tensors = random_tensors(4)
    with pytest.raises(ValueError, match="shard_size must be a positive int"):
        write_dataset(tmp_path / "a", tensors, shard_size=0)
    with pytest.raises(TypeError, match="JSON-serialisable"):
        write_dataset(tmp_path / "a", tensors, metadata={"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="0 samples"):
        write_dataset(tmp_path / "a", {k: v[:0] for k, v in tensors.items()})
    with pytest.raises(TypeError, match="dict of field name"):
        write_dataset(tmp_path / "a", [tensors["text"]])
    writer = DatasetWriter(tmp_path / "b", shard_size=2)
    writer.add(tensors)
    with pytest.raises(ValueError, match="every add needs the same fields"):
        writer.add({k: v for k, v in tensors.items() if k != "history"})
    writer.abort()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- bad files -------------------------------------------------------------------------------------
def _dataset(tmp_path, n=10, shard_size=4):
    tensors = random_tensors(n)
    return write_dataset(tmp_path / "ds", tensors, shard_size=shard_size), tensors


def _edit_index(path, edit):
    index = json.loads((path / "dataset.json").read_text())
    edit(index)
    (path / "dataset.json").write_text(json.dumps(index))


def test_reader_errors_on_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset directory .* not found"):
        LatentDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="dataset.json not found"):
        LatentDataset(tmp_path / "empty")
    path, _ = _dataset(tmp_path)
    (path / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LatentDataset(path)
    path, _ = _dataset(tmp_path / "x")
    _edit_index(path, lambda i: i.update(format="webdataset"))
    with pytest.raises(ValueError, match="not a wam_fast latent dataset: format 'webdataset'"):
        LatentDataset(path)
    _edit_index(path, lambda i: i.update(format="wam_fast.latents", version=2))
    with pytest.raises(ValueError, match="format version 2; this wam_fast reads version 1"):
        LatentDataset(path)
    _edit_index(path, lambda i: i.update(version=1, num_samples=11))
    with pytest.raises(ValueError, match="num_samples is 11 but the shards hold 10"):
        LatentDataset(path)
    _edit_index(path, lambda i: (i.update(num_samples=10), i["shards"][0].update(file="../elsewhere.safetensors")))
    with pytest.raises(ValueError, match="a file name in the dataset directory"):
        LatentDataset(path)


def test_reader_errors_on_bad_shards(tmp_path):
    from safetensors.torch import save_file

    path, tensors = _dataset(tmp_path)
    (path / "shard-00001.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="shard shard-00001.safetensors .* is missing"):
        LatentDataset(path)

    def rewrite(edit):
        """Shard 1 rewritten from the original rows with ``edit`` applied; the index's byte count is
        kept honest, so the tensor check is what fails."""
        f = path / "shard-00001.safetensors"
        shard_tensors = {k: v[4:8].clone() for k, v in tensors.items()}
        edit(shard_tensors)
        save_file(shard_tensors, str(f))
        _edit_index(path, lambda i: i["shards"][1].update(bytes=f.stat().st_size))

    rewrite(lambda t: t.update(actions=t["actions"][:, :3].contiguous()))
    with pytest.raises(ValueError, match=r"shard .*shard-00001.safetensors: tensor 'actions' has shape \(4, 3, 7\)"):
        LatentDataset(path)
    rewrite(lambda t: t.update(actions=torch.zeros(4, 4, 7, dtype=torch.float16)))
    with pytest.raises(ValueError, match="tensor 'actions' has shape .* dtype torch.float16"):
        LatentDataset(path)
    rewrite(lambda t: t.update(actions=t["actions"][:3].clone()))
    with pytest.raises(ValueError, match=r"tensor 'actions' has shape \(3, "):
        LatentDataset(path)
    rewrite(lambda t: t.pop("robot_id"))
    with pytest.raises(ValueError, match=r"shard-00001.safetensors: tensor 'robot_id' missing"):
        LatentDataset(path)


def test_reader_errors_on_truncated_or_corrupt_shards(tmp_path):
    path, _ = _dataset(tmp_path)
    shard = path / "shard-00002.safetensors"
    good = shard.read_bytes()
    shard.write_bytes(good[:-7])
    with pytest.raises(ValueError, match="shard-00002.safetensors has .* bytes, the index says .*truncated or corrupt"):
        LatentDataset(path)
    shard.write_bytes(b"\xff" * 8 + good[8:])  # same size, garbage header length
    with pytest.raises(ValueError, match="shard-00002.safetensors cannot be read as safetensors"):
        LatentDataset(path)
    flipped = bytearray(good)
    flipped[-1] ^= 0xFF  # a data byte: only the checksum sees it
    shard.write_bytes(bytes(flipped))
    LatentDataset(path)  # headers are fine
    with pytest.raises(ValueError, match="shard-00002.safetensors: sha256 differs"):
        LatentDataset(path, verify=True)
    # no size or checksum in the index (hand-written): safetensors' own header check still catches truncation
    _edit_index(path, lambda i: [s.pop("bytes") for s in i["shards"]])
    shard.write_bytes(good[:-7])
    with pytest.raises(ValueError, match="cannot be read as safetensors \\(truncated or corrupt\\)"):
        LatentDataset(path)


# ---- check_fits ------------------------------------------------------------------------------------
def test_check_fits_lists_every_mismatch(tmp_path):
    c = small_config(mask="temporal", history_frames=2, num_robots=3)
    ds = LatentDataset(write_dataset(tmp_path / "ds", random_tensors(6, c, history=2, robots=3)))
    ds.check_fits(c)
    bad = small_config(text_len=3, latent_channels=8, latent_frames=3, action_dim=5, mask="temporal",
                       history_frames=1, num_robots=2)
    with pytest.raises(ValueError) as info:
        ds.check_fits(bad)
    message = str(info.value)
    for part in (r"text is (2, 32) per sample, the model takes (text_len, text_dim) = (3, 32)",
                 "image is (1, 4, 4, 4) per sample, the model's latent frame is (1, C, H, W) = (1, 8, 4, 4)",
                 "latent_frames - 1 = 2 future frames",
                 "actions are (4, 7) per sample, the model's chunk is (action_len, action_dim) = (4, 5)",
                 "history holds 2 frames per sample, the model takes at most config.history_frames = 1",
                 "history frames are (4, 4, 4), the model's latent frame is (8, 4, 4)",
                 "robot_id goes up to 2, the model has num_robots = 2"):
        assert part in message, (part, message)
    assert message.count("\n  - ") == 7
    full = small_config()
    with pytest.raises(ValueError, match="(?s)history holds 2 frames.*mask='temporal'.*no robot-id embedding"):
        ds.check_fits(full)
    plain = LatentDataset(write_dataset(tmp_path / "plain", random_tensors(3, history=0, robots=0)))
    with pytest.raises(ValueError, match="num_robots = 3\\) but the dataset has no robot_id"):
        plain.check_fits(c)


# ---- overwrite safety ------------------------------------------------------------------------------
def _snapshot(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_existing_dataset_is_refused_then_replaced(tmp_path):
    old = random_tensors(9)
    path = write_dataset(tmp_path / "ds", old, shard_size=4)
    before = _snapshot(path)
    with pytest.raises(FileExistsError, match="already holds a dataset.*overwrite=True"):
        write_dataset(path, random_tensors(5), shard_size=4)
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        make_synthetic_dataset(path, small_config(), 5, seed=0)
    assert _snapshot(path) == before
    new = random_tensors(5, history=0, robots=0)
    write_dataset(path, new, shard_size=2, overwrite=True)
    ds = LatentDataset(path, verify=True)
    assert_rows_equal(ds.get(torch.arange(5)), new, torch.arange(5))
    assert sorted(p.name for p in path.iterdir()) == sorted(["dataset.json"] + [s["file"] for s in ds._shards])
    assert not any(name in before for name in os.listdir(path) if name != "dataset.json")  # fresh shard names


@pytest.mark.parametrize("crash_at", ["second shard", "index swap"])
def test_crash_while_overwriting_keeps_the_old_dataset(tmp_path, monkeypatch, crash_at):
    old = random_tensors(9)
    path = write_dataset(tmp_path / "ds", old, shard_size=4)
    before = _snapshot(path)
    real = D.atomic_write
    calls = []

    def crashing(target, write):
        calls.append(target.name)
        crash = (crash_at == "index swap" and target.name == "dataset.json") or (
            crash_at == "second shard" and len(calls) == 2)
        if crash:
            def torn(tmp):
                write(tmp)  # the temporary file is complete, the process dies before the rename
                raise KeyboardInterrupt("killed")
            return real(target, torn)
        return real(target, write)

    monkeypatch.setattr(D, "atomic_write", crashing)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(path, random_tensors(8, history=0), shard_size=3, overwrite=True)
    monkeypatch.undo()
    assert _snapshot(path) == before  # no new shard, no temporary file, old index and shards untouched
    assert_rows_equal(LatentDataset(path, verify=True).get(torch.arange(9)), old, torch.arange(9))


def test_crash_in_a_fresh_directory_leaves_no_dataset(tmp_path, monkeypatch):
    real = D.atomic_write

    def crashing(target, write):
        if target.name == "dataset.json":
            raise RuntimeError("disk full")
        return real(target, write)

    monkeypatch.setattr(D, "atomic_write", crashing)
    with pytest.raises(RuntimeError, match="disk full"):
        write_dataset(tmp_path / "new", random_tensors(9), shard_size=4)
    assert not (tmp_path / "new").exists()


# ---- synthetic data --------------------------------------------------------------------------------
def test_synthetic_dataset_is_deterministic_in_seed(tmp_path):
    c = small_config()
    a = LatentDataset(make_synthetic_dataset(tmp_path / "a", c, 300, seed=5, shard_size=64))
    b = LatentDataset(make_synthetic_dataset(tmp_path / "b", c, 300, seed=5, shard_size=1000))
    other = LatentDataset(make_synthetic_dataset(tmp_path / "c", c, 300, seed=6))
    rows = torch.arange(300)
    got_a, got_b, got_other = a.get(rows), b.get(rows), other.get(rows)
    for name in got_a:  # same seed: same samples whatever the sharding
        assert torch.equal(got_a[name], got_b[name]), name
    assert not torch.equal(got_a["actions"], got_other["actions"])
    assert a.metadata["synthetic"]["seed"] == 5 and wam_fast.WAMConfig.from_dict(a.metadata["synthetic"]["config"]) == c
    # a prefix of a longer dataset is the shorter dataset
    assert torch.equal(synthetic_task(c, 5).samples(40, start=260)[0]["image"], got_a["image"][260:])
    a.check_fits(c)


@pytest.mark.parametrize("action_dim", [7, 1])
def test_synthetic_structure(action_dim):
    c = small_config(action_dim=action_dim, latent_frames=3)
    task = synthetic_task(c, seed=2)
    tensors, labels = task.samples(512)
    instruction, scene, mode = labels["instruction"], labels["scene"], labels["mode"]
    # the labels are recoverable from the data: text -> instruction, image -> scene, actions -> mode
    got = task.classify(tensors["text"], tensors["image"], tensors["actions"])
    assert torch.equal(got[0], instruction) and torch.equal(got[1], scene) and torch.equal(got[2], mode)
    assert bool((got[3] < task.IN_MODE).all())
    assert torch.equal(mode // 2, scene)
    # per (instruction, scene): two modes, both used, well separated, the average between them far from both
    for ci in range(task.num_instructions):
        for s in range(2):
            rows = (instruction == ci) & (scene == s)
            assert set(mode[rows].tolist()) == {2 * s, 2 * s + 1}
            a, b = task.centres[ci, 2 * s], task.centres[ci, 2 * s + 1]
            assert (a - b).abs().max() >= 1.0 and (a - b).norm() >= 10 * task.MODE_STD
        assert len({tuple(x) for x in task.centres[ci].tolist()}) == 4
    # future frames: a deterministic function of image and mode (roll by +-j on the width axis + level)
    image, future = tensors["image"][:, 0], tensors["future"]
    assert future.shape == (512, 2, 4, 4, 4)
    for i in (0, 1, 2, 3, 100):
        d = 1 if int(mode[i]) % 2 == 0 else -1
        for j in (1, 2):
            want = 0.8 ** j * image[i].roll(j * d, dims=-1) + task.LEVELS[int(mode[i])]
            torch.testing.assert_close(future[i, j - 1], want)
    assert torch.equal(task.future(tensors["image"], mode), future)
    # the two modes of one image give different futures: video and actions are coupled
    assert not torch.allclose(task.future(tensors["image"][:1], torch.tensor([0])),
                              task.future(tensors["image"][:1], torch.tensor([1])))


def test_synthetic_history_and_robots(tmp_path):
    c = small_config(mask="temporal", history_frames=2, num_robots=3)
    ds = LatentDataset(make_synthetic_dataset(tmp_path / "ds", c, 64, seed=1))
    ds.check_fits(c)
    got = ds.get(torch.arange(64))
    assert got["history"].shape == (64, 2, 4, 4, 4) and got["robot_id"].dtype == torch.int64
    assert set(got["robot_id"].tolist()) == {0, 1, 2}
    image = got["image"][:, 0]
    for i in range(64):
        oldest, last = got["history"][i]
        # one direction of motion before: the frame a steps back is the image rolled by -a * d'
        assert any(torch.equal(last, image[i].roll(-d, -1)) and torch.equal(oldest, image[i].roll(-2 * d, -1))
                   for d in (1, -1)), i
    task = synthetic_task(c, seed=1)
    *_, distance = task.classify(got["text"], got["image"], got["actions"], got["robot_id"])
    assert bool((distance < task.IN_MODE).all())  # robot gains are part of the mode centres


def test_row_seed_spreads_rows_and_runs():
    seeds = {row_seed(s, i) for s in range(4) for i in range(1000)}
    assert len(seeds) == 4000 and all(0 <= x < 2 ** 63 for x in seeds)
    assert row_seed(0, 5) == row_seed(0, 5)


# ---- teacher rollout -------------------------------------------------------------------------------
def _conditions(tmp_path, config, n=7, history=0, robots=0, targets=True):
    tensors = random_tensors(n, config, history=history, robots=robots)
    tensors["text"] = tensors["text"].float()
    if not targets:
        del tensors["future"], tensors["actions"]
    return LatentDataset(write_dataset(tmp_path / "conditions", tensors, shard_size=3)), tensors


def _per_row_reference(teacher, tensors, seed, **options):
    """What sample() gives each row alone with the row's seed: (future, actions)."""
    futures, actions = [], []
    for i in range(len(tensors["text"])):
        extra = {}
        if "history" in tensors and teacher.config.history_frames:
            extra["history"] = tensors["history"][i:i + 1, -teacher.config.history_frames:]
        if "robot_id" in tensors and teacher.config.num_robots:
            extra["robot_id"] = tensors["robot_id"][i:i + 1]
        chunk = wam_fast.sample(teacher, tensors["text"][i:i + 1], tensors["image"][i:i + 1],
                                seed=row_seed(seed, i), return_video=True, **options, **extra)
        futures.append(chunk.video[:, 1:] if teacher.config.mask == "full" else chunk.video)
        actions.append(chunk.actions)
    return torch.cat(futures), torch.cat(actions)


def test_rollout_targets_come_from_the_full_teacher(tmp_path):
    c = small_config(latent_frames=3)
    teacher = wam_fast.WAMTransformer(c).eval()
    conditions, tensors = _conditions(tmp_path, c, history=0, robots=0)
    path = teacher_rollout(teacher, conditions, tmp_path / "rolled", steps=3, seed=11, batch_size=3)
    ds = LatentDataset(path)
    assert ds.has_targets and len(ds) == 7 and set(ds.fields) == {"text", "image", "future", "actions"}
    got = ds.get(torch.arange(7))
    future, actions = _per_row_reference(teacher, tensors, 11, steps=3)  # default sampler ddim, cfg 6
    assert future.shape == (7, 2, 4, 4, 4)  # frame 0 (the observation) dropped
    torch.testing.assert_close(got["future"], future, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["actions"], actions, atol=1e-5, rtol=1e-5)
    assert torch.equal(got["text"], tensors["text"]) and torch.equal(got["image"], tensors["image"])
    assert not torch.allclose(got["actions"], tensors["actions"])  # the conditions' targets are ignored
    meta = ds.metadata["teacher_rollout"]
    assert (meta["sampler"], meta["steps"], meta["cfg_scale"], meta["seed"]) == ("ddim", 3, 6.0, 11)
    assert wam_fast.WAMConfig.from_dict(meta["teacher"]) == c
    ds.check_fits(c)


def test_rollout_is_batch_size_independent(tmp_path):
    c = small_config()
    teacher = wam_fast.WAMTransformer(c).eval()
    conditions, _ = _conditions(tmp_path, c, n=7, targets=False, history=0, robots=0)
    runs = [LatentDataset(teacher_rollout(teacher, conditions, tmp_path / f"b{bs}", steps=2, seed=3,
                                          batch_size=bs)).get(torch.arange(7)) for bs in (1, 3, 64)]
    for other in runs[1:]:
        torch.testing.assert_close(other["actions"], runs[0]["actions"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(other["future"], runs[0]["future"], atol=1e-5, rtol=1e-5)
    reseeded = LatentDataset(teacher_rollout(teacher, conditions, tmp_path / "s4", steps=2, seed=4)).get(torch.arange(7))
    assert not torch.allclose(reseeded["actions"], runs[0]["actions"])


def test_rollout_temporal_teacher_with_history_and_robots(tmp_path):
    c = small_config(latent_frames=3, mask="temporal", history_frames=1, num_robots=3)
    teacher = wam_fast.WAMTransformer(c).eval()
    conditions, tensors = _conditions(tmp_path, c, n=5, history=2, robots=3)
    path = teacher_rollout(teacher, tmp_path / "conditions", tmp_path / "rolled", steps=2, cfg_scale=1.0,
                           batch_size=2)  # conditions given as a directory
    got = LatentDataset(path).get(torch.arange(5))
    future, actions = _per_row_reference(teacher, tensors, 0, steps=2, cfg_scale=1.0)
    assert future.shape == (5, 2, 4, 4, 4)  # the temporal teacher's noisy frames are the future: nothing dropped
    torch.testing.assert_close(got["future"], future, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["actions"], actions, atol=1e-5, rtol=1e-5)
    # the teacher saw its last history frame only; the dataset keeps both for the student
    assert torch.equal(got["history"], tensors["history"]) and torch.equal(got["robot_id"], tensors["robot_id"])
    with pytest.raises(ValueError, match="history holds 2 frames"):
        LatentDataset(path).check_fits(c)


def test_rollout_stochastic_sampler_runs_rows_alone(tmp_path):
    c = small_config()
    teacher = wam_fast.WAMTransformer(c).eval()
    conditions, tensors = _conditions(tmp_path, c, n=4, targets=False)
    options = dict(sampler="dpm++2m-sde", steps=3, cfg_scale=2.0)
    got = [LatentDataset(teacher_rollout(teacher, conditions, tmp_path / f"b{bs}", seed=1, batch_size=bs,
                                         **options)).get(torch.arange(4)) for bs in (1, 4)]
    future, actions = _per_row_reference(teacher, tensors, 1, **options)
    for run in got:
        torch.testing.assert_close(run["actions"], actions, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run["future"], future, atol=1e-5, rtol=1e-5)
    assert any(f["op"] == "distill.teacher_rollout" for f in wam_fast.ops.fallbacks())


def test_rollout_refuses_conditions_that_do_not_fit(tmp_path):
    c = small_config(num_robots=2)
    conditions, _ = _conditions(tmp_path, small_config(text_len=3), n=3, robots=0)
    with pytest.raises(ValueError, match="(?s)do not fit the teacher.*text is \\(3, 32\\).*has no robot_id"):
        teacher_rollout(wam_fast.WAMTransformer(c), conditions, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(TypeError, match="conditions must be a LatentDataset"):
        teacher_rollout(wam_fast.WAMTransformer(c), {"text": None}, tmp_path / "out")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        teacher_rollout(wam_fast.WAMTransformer(c), conditions, tmp_path / "out", batch_size=0)
    fitting, _ = _conditions(tmp_path / "fit", small_config(), n=3, robots=0)
    with pytest.raises(ValueError, match="sampler 'euler' does not fit"):  # sample()'s own check, first batch
        teacher_rollout(wam_fast.WAMTransformer(small_config()), fitting, tmp_path / "out", sampler="euler")
    assert not (tmp_path / "out").exists()


class _FailingTeacher(wam_fast.WAMTransformer):
    """A teacher that dies on its n-th forward (a crash in the middle of a rollout)."""

    fail_at = 4

    def forward(self, *args, **kwargs):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.fail_at:
            raise RuntimeError("out of memory")
        return super().forward(*args, **kwargs)


def test_rollout_crash_leaves_no_dataset_and_keeps_an_old_one(tmp_path):
    c = small_config()
    conditions, _ = _conditions(tmp_path, c, n=7, targets=False)
    with pytest.raises(RuntimeError, match="out of memory"):
        teacher_rollout(_FailingTeacher(c), conditions, tmp_path / "out", steps=1, batch_size=2, shard_size=2)
    assert not (tmp_path / "out").exists()
    old = teacher_rollout(wam_fast.WAMTransformer(c), conditions, tmp_path / "out", steps=1)
    before = _snapshot(old)
    with pytest.raises(FileExistsError):
        teacher_rollout(wam_fast.WAMTransformer(c), conditions, old, steps=1)
    with pytest.raises(RuntimeError, match="out of memory"):
        teacher_rollout(_FailingTeacher(c), conditions, old, steps=1, batch_size=2, shard_size=2, overwrite=True)
    assert _snapshot(old) == before
    LatentDataset(old, verify=True)


def test_rollout_bf16_teacher_writes_float32_targets(tmp_path):
    c = small_config()
    teacher = wam_fast.WAMTransformer(c).to(torch.bfloat16).eval()
    conditions, _ = _conditions(tmp_path, c, n=3, targets=False)
    ds = LatentDataset(teacher_rollout(teacher, conditions, tmp_path / "out", steps=2))
    assert ds.fields["actions"].dtype == torch.float32 and ds.fields["text"].dtype == torch.float32
    assert bool(torch.isfinite(ds.get(torch.arange(3))["future"]).all())


def test_non_finite_values_in_a_shard_are_named_when_opened(tmp_path):
    """A NaN that got into a shard after it was written (the writer refuses them) is found when the distill
    CLI opens the dataset, naming the shard, the field and the sample, not as a diverged training."""
    import struct

    from wam_fast.distill.commands import CLIError, open_dataset

    path = write_dataset(tmp_path / "ds", random_tensors(7), shard_size=3)
    LatentDataset(path).check_finite()  # clean
    shard = sorted(path.glob("*.safetensors"))[1]
    data = bytearray(shard.read_bytes())  # in place: same size, a valid file, one float32 NaN
    header_len = struct.unpack("<Q", data[:8])[0]
    entry = json.loads(data[8:8 + header_len])["actions"]
    assert entry["dtype"] == "F32"
    k, a = entry["shape"][1:]
    at = 8 + header_len + entry["data_offsets"][0] + 4 * (2 * k * a + 1)  # sample 2, step 0, dim 1
    data[at:at + 4] = struct.pack("<f", float("nan"))
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"shard .*{shard.name}: field 'actions' has NaN or inf values in 1 of 3 "
                                         r"samples \(first: sample 2 of the shard, 5 of the dataset\)"):
        LatentDataset(path).check_finite()
    with pytest.raises(CLIError, match="field 'actions' has NaN or inf"):
        open_dataset(path)
