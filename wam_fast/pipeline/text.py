"""Text encoders: an instruction string -> the (1, text_len, text_dim) embedding a WAM reads.

``T5TextEncoder``: transformers' T5EncoderModel + its tokenizer, padded / truncated to text_len.
``FixedTextEncoder``: one fixed embedding per known instruction, given by the user (the Meta-World
harness has one per task). ``WAMPipeline`` runs either once per instruction and caches the result.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch

from wam_fast.pipeline.encoders import require, write_json


class T5TextEncoder:
    kind = "t5"

    def __init__(self, model, tokenizer, text_len: int):
        require("transformers")
        self.model, self.tokenizer, self.text_len = model.eval().requires_grad_(False), tokenizer, int(text_len)

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, instruction: str) -> torch.Tensor:
        tokens = self.tokenizer([instruction], padding="max_length", max_length=self.text_len, truncation=True,
                                return_tensors="pt")
        device = next(self.model.parameters()).device
        return self.model(input_ids=tokens["input_ids"].to(device)).last_hidden_state

    def to(self, device=None, dtype=None):
        self.model.to(device=device, dtype=dtype)
        return self

    def save(self, directory: Path, tokenizer_directory: Path) -> None:
        self.model.save_pretrained(str(directory), safe_serialization=True)
        self.tokenizer.save_pretrained(str(tokenizer_directory))

    @classmethod
    def load(cls, directory: Path, tokenizer_directory: Path, text_len: int, device=None, dtype=None):
        require("transformers")
        from transformers import AutoTokenizer, T5EncoderModel

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_directory))
        model = T5EncoderModel.from_pretrained(str(directory), dtype=dtype)
        return cls(model.to(device), tokenizer, text_len)


class FixedTextEncoder:
    """instruction -> a fixed (text_len, text_dim) embedding; an unknown instruction is refused."""

    kind = "fixed"

    def __init__(self, embeddings: Dict[str, torch.Tensor]):
        if not isinstance(embeddings, dict) or not embeddings:
            raise ValueError("FixedTextEncoder needs a non-empty dict instruction -> (text_len, text_dim) tensor")
        shapes = {tuple(v.shape) for v in embeddings.values() if isinstance(v, torch.Tensor)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2 or len(embeddings) != \
                sum(isinstance(v, torch.Tensor) for v in embeddings.values()):
            raise ValueError(f"FixedTextEncoder: every embedding must be a (text_len, text_dim) tensor of one shape, "
                             f"got {sorted(shapes)}")
        self.embeddings = {str(k): v.detach() for k, v in embeddings.items()}

    @property
    def dim(self) -> int:
        return int(next(iter(self.embeddings.values())).shape[1])

    @property
    def text_len(self) -> int:
        return int(next(iter(self.embeddings.values())).shape[0])

    def encode(self, instruction: str) -> torch.Tensor:
        if instruction not in self.embeddings:
            raise ValueError(f"instruction {instruction!r} has no fixed embedding; known: {sorted(self.embeddings)}")
        return self.embeddings[instruction][None]

    def to(self, device=None, dtype=None):
        self.embeddings = {k: v.to(device=device, dtype=dtype) for k, v in self.embeddings.items()}
        return self

    def save(self, directory: Path, tokenizer_directory=None) -> None:
        from safetensors.torch import save_file

        from wam_fast.utils.files import atomic_write

        names = sorted(self.embeddings)  # instructions go in JSON; tensors are keyed by index
        tensors = {str(i): self.embeddings[name].contiguous().cpu() for i, name in enumerate(names)}
        atomic_write(Path(directory) / "embeddings.safetensors", lambda tmp: save_file(tensors, tmp))
        write_json(Path(directory) / "instructions.json", {"instructions": names})

    @classmethod
    def load(cls, directory: Path, tokenizer_directory=None, text_len=None, device=None, dtype=None):
        from safetensors.torch import load_file

        names = json.loads((Path(directory) / "instructions.json").read_text())["instructions"]
        tensors = load_file(str(Path(directory) / "embeddings.safetensors"))
        return cls({name: tensors[str(i)] for i, name in enumerate(names)}).to(device, dtype)


TEXT_ENCODERS = {"t5": T5TextEncoder, "fixed": FixedTextEncoder}
