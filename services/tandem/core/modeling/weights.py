"""Read only the tensors a stage needs from a Hugging Face safetensors checkpoint."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from tandem.core.errors import ModelLoadError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointIndex:
    """Where each tensor of a checkpoint lives: one file, or shards named by an index."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index_path = self.model_dir / INDEX_FILE
        single_path = self.model_dir / SINGLE_FILE
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise ModelLoadError(f"{index_path}: not a valid safetensors index ({e})") from None
            self.file_of: dict[str, Path] = {name: self.model_dir / f for name, f in weight_map.items()}
        elif single_path.exists():
            self.file_of = {name: single_path for name in _keys(single_path)}
        else:
            raise ModelLoadError(f"{self.model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")

    def load(self, expected: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        """Load the named tensors, checking that each exists and has the expected shape."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in expected:
            if name not in self.file_of:
                raise ModelLoadError(f"{self.model_dir}: tensor {name!r} is not in the checkpoint")
            by_file[self.file_of[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            if not path.exists():
                raise ModelLoadError(f"{path}: shard file not found (it holds {names[0]!r})")
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in names:
                        out[name] = f.get_tensor(name)
            except Exception as e:  # safetensors raises several types for corrupt files
                raise ModelLoadError(f"{path}: cannot read safetensors file ({e})") from None
            for name in names:
                got, want = tuple(out[name].shape), tuple(expected[name])
                if got != want:
                    raise ModelLoadError(f"{path}: tensor {name!r} has shape {list(got)}, expected {list(want)}")
        return out


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read safetensors file ({e})") from None
