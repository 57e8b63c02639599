"""A pipeline on disk: one directory, safetensors + JSON only (no pickle), written atomically.

    pipeline.json        format, image size, which frame / text encoder, sampling options
    transformer/         the WAM (wam_fast.save_pretrained's format)
    vae/                 the CogVideoX VAE (diffusers' format), or frame_encoder/ for any other encoder
    text_encoder/        the T5 encoder (transformers' format), or the fixed embeddings
    tokenizer/           the T5 tokenizer (tokenizer.json), T5 only
    normalization.json   action mean / std per action dim (absent: identity)

Everything is written into a temporary sibling directory, which is then renamed into place, so an
interrupted save leaves no partial pipeline. Loading names the part and the path that is missing or
does not load.
"""
from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from wam_fast.models.transformer import load_pretrained, save_pretrained
from wam_fast.pipeline.encoders import FRAME_ENCODERS, write_json
from wam_fast.pipeline.text import TEXT_ENCODERS
from wam_fast.utils.files import fsync_dir, plain_mode

FORMAT = "wam_fast.pipeline/1"


def frame_encoder_dir(name: str) -> str:
    return "vae" if name == "cogvideox" else "frame_encoder"


def save(pipe, directory) -> Path:
    directory = Path(directory)
    if directory.exists() and not (directory / "pipeline.json").is_file():
        raise ValueError(f"{directory} exists and is not a saved pipeline (no pipeline.json): refusing to replace it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        os.chmod(tmp, plain_mode(0o777))
        save_pretrained(pipe.model, tmp / "transformer")
        encoder = pipe.frame_encoder
        (tmp / frame_encoder_dir(encoder.name)).mkdir()
        encoder.save(tmp / frame_encoder_dir(encoder.name))
        (tmp / "text_encoder").mkdir()
        tokenizer = tmp / "tokenizer" if pipe.text_encoder.kind == "t5" else None
        pipe.text_encoder.save(tmp / "text_encoder", tokenizer)
        if pipe.normalization is not None:
            write_json(tmp / "normalization.json", {k: v.tolist() for k, v in pipe.normalization.items()})
        write_json(tmp / "pipeline.json", {  # last: marks the directory complete
            "format": FORMAT, "image_size": list(encoder.image_size),
            "frame_encoder": {"name": encoder.name, "module": encoder.module},
            "text_encoder": {"kind": pipe.text_encoder.kind}, "steps": pipe.steps, "sampler": pipe.sampler,
            "cache": pipe.cache, "cfg_scale": pipe.cfg_scale,
            "decode_video": pipe.decode_video})
        pickles = [str(p) for p in tmp.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
        if pickles:
            raise RuntimeError(f"a part was written as pickle ({pickles}); a pipeline holds safetensors + JSON only")
        old = None
        if directory.exists():  # replace a saved pipeline: move it aside, move the new one in, drop the old
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
            os.replace(directory, old / "pipeline")
        os.replace(tmp, directory)
        fsync_dir(directory.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_part(part: str, path: Path, loader):
    """Run ``loader()``; a missing or unreadable part raises naming the part and the path."""
    if not path.exists():
        raise FileNotFoundError(f"saved pipeline: part {part!r} is missing (expected {path})")
    try:
        return loader()
    except ImportError:
        raise
    except Exception as error:
        raise ValueError(f"saved pipeline: part {part!r} at {path} does not load: "
                         f"{type(error).__name__}: {error}") from error


def load(cls, directory, device=None, dtype=None):
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no saved pipeline at {directory} (not a directory)")
    meta = load_part("pipeline.json", directory / "pipeline.json",
                     lambda: json.loads((directory / "pipeline.json").read_text()))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"saved pipeline: part 'pipeline.json' at {directory / 'pipeline.json'} is not of format "
                         f"{FORMAT!r}: got {meta.get('format') if isinstance(meta, dict) else meta!r}")
    model = load_part("transformer", directory / "transformer",
                      lambda: load_pretrained(directory / "transformer", device=device, dtype=dtype))
    model.eval()
    dtype = next(model.parameters()).dtype
    name = meta["frame_encoder"]["name"]
    if name not in FRAME_ENCODERS:
        importlib.import_module(meta["frame_encoder"]["module"])  # the module registering it
    if name not in FRAME_ENCODERS:
        raise ValueError(f"saved pipeline: frame encoder {name!r} is not registered (known: {sorted(FRAME_ENCODERS)})")
    encoder_path = directory / frame_encoder_dir(name)
    encoder = load_part(frame_encoder_dir(name), encoder_path,
                        lambda: FRAME_ENCODERS[name].load(encoder_path, device=device, dtype=dtype))
    kind = meta["text_encoder"]["kind"]
    if kind not in TEXT_ENCODERS:
        raise ValueError(f"saved pipeline: text encoder kind {kind!r} unknown (known: {sorted(TEXT_ENCODERS)})")
    tokenizer = directory / "tokenizer"
    if kind == "t5":
        load_part("tokenizer", tokenizer, lambda: None)
    text = load_part("text_encoder", directory / "text_encoder",
                     lambda: TEXT_ENCODERS[kind].load(directory / "text_encoder", tokenizer, model.config.text_len,
                                                      device=device, dtype=dtype))
    normalization = None
    if (directory / "normalization.json").exists():
        normalization = load_part("normalization.json", directory / "normalization.json",
                                  lambda: json.loads((directory / "normalization.json").read_text()))
    return cls(model, encoder, text, normalization, steps=meta.get("steps"), sampler=meta.get("sampler"),
               cache=meta.get("cache"), cfg_scale=meta.get("cfg_scale"),
               decode_video=bool(meta.get("decode_video", False)))
