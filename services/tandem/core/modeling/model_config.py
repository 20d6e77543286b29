"""Model configuration read from a Hugging Face model directory (config.json).

Supported: Llama 2 and 3 (llama3 rope scaling), Mistral, Qwen2. Both the older
`rope_theta` / `rope_scaling` keys and the newer `rope_parameters` block are read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tandem.core.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def config_sha256(model_dir: str | Path) -> str:
    """SHA-256, in hex, of a model directory's config.json: services that agree on it load the same model."""
    return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Llama-family decoder, as the stages need it."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    dtype: str

    def kv_block_bytes(self, block_size: int, itemsize: int) -> int:
        """Bytes of one KV block (keys and values of `block_size` tokens) over all the layers."""
        return self.num_hidden_layers * 2 * block_size * self.num_key_value_heads * self.head_dim * itemsize

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        raw = _read_json(path)
        gen_path = Path(model_dir) / "generation_config.json"
        gen = _read_json(gen_path) if gen_path.exists() else {}
        return cls.from_dict(raw, generation=gen, source=str(path))

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], generation: dict[str, Any] | None = None, source: str = "config.json"
    ) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = raw.get("architectures")
            raise ModelLoadError(
                f"{source}: unsupported architecture model_type={model_type!r} (architectures={archs}); "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(key: str) -> Any:
            if key not in raw:
                raise ModelLoadError(f"{source}: missing required key {key!r}")
            return raw[key]

        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
        if model_type == "qwen2" and raw.get("use_sliding_window"):
            raise ModelLoadError(f"{source}: Qwen2 use_sliding_window=true is not supported")

        hidden = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        head_dim = raw.get("head_dim") or hidden // num_heads
        num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise ModelLoadError(
                f"{source}: num_attention_heads={num_heads} is not a multiple of num_key_value_heads={num_kv_heads}"
            )
        attention_bias = bool(raw.get("attention_bias", False))
        sliding = raw.get("sliding_window") if model_type == "mistral" else None
        generation = generation or {}
        eos = generation.get("eos_token_id", raw.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            rope=_rope_config(raw, source),
            qkv_bias=attention_bias or model_type == "qwen2",
            o_bias=attention_bias and model_type != "qwen2",
            mlp_bias=bool(raw.get("mlp_bias", False)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=int(sliding) if sliding else None,
            eos_token_ids=eos_ids,
            bos_token_id=generation.get("bos_token_id", raw.get("bos_token_id")),
            dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "float32"),
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: file not found") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _rope_config(raw: dict[str, Any], source: str) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or {})
    scaling = raw.get("rope_scaling") or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{source}: rope_type={rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    defaults = RopeConfig()
    return RopeConfig(
        rope_type=rope_type,
        theta=float(theta),
        factor=float(params.get("factor", defaults.factor)),
        low_freq_factor=float(params.get("low_freq_factor", defaults.low_freq_factor)),
        high_freq_factor=float(params.get("high_freq_factor", defaults.high_freq_factor)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", defaults.original_max_position_embeddings)
        ),
    )
