"""One pipeline stage of a Llama-family decoder: layers [start, end) and, at the ends, the
embeddings (stage 0) and the final norm and LM head (last stage).

`forward` maps a step's tokens (stage 0) or hidden states (later stages) to hidden states;
`compute_logits` is separate and runs only on the last stage.
"""

from __future__ import annotations

import typing
from pathlib import Path

import torch
from torch import nn

from tandem.core.errors import ConfigError
from tandem.core.modeling.attention import AttentionMetadata
from tandem.core.modeling.kv_cache import PagedKVCache
from tandem.core.modeling.layers import DecoderLayer, RMSNorm
from tandem.core.modeling.linear import PackedLinear
from tandem.core.modeling.model_config import ModelConfig
from tandem.core.modeling.rope import RotaryEmbedding
from tandem.core.modeling.stages import LayerRange
from tandem.core.modeling.weights import CheckpointIndex

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto` is the checkpoint's dtype on CUDA and float32 on CPU."""
    if name == "auto":
        name = config.dtype if device.type == "cuda" and config.dtype in DTYPES else "float32"
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not one of {', '.join(['auto', *DTYPES])}")
    return DTYPES[name]


class StageModel(nn.Module):
    def __init__(self, config: ModelConfig, layers: LayerRange):
        super().__init__()
        self.config, self.layer_range = config, layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size) if layers.is_first else None
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in layers)
        if layers.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
            self.lm_head: nn.Module | None = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        else:
            self.norm = self.lm_head = None
        self.rotary: RotaryEmbedding | None = None
        self._checkpoint_names = self._names_in_checkpoint()

    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        layers: LayerRange,
        device: torch.device | str = "cpu",
        dtype: str = "auto",
        config: ModelConfig | None = None,
    ) -> "StageModel":
        """Build the stage and load only its own tensors from the checkpoint."""
        config = config or ModelConfig.from_dir(model_dir)
        device = torch.device(device)
        with torch.device("meta"):
            model = cls(config, layers)
        names = model.checkpoint_names()
        shapes = {ckpt: tuple(p.shape) for local, p in model.named_parameters() for ckpt in [names[local]]}
        tensors = CheckpointIndex(model_dir).load(shapes)
        torch_dtype = resolve_dtype(dtype, config, device)
        state = {local: tensors[names[local]].to(device=device, dtype=torch_dtype) for local in names}
        model.load_state_dict(state, assign=True, strict=True)
        model.pack()
        model.rotary = RotaryEmbedding(config.rope, config.head_dim, device)
        return model.eval()

    def checkpoint_names(self) -> dict[str, str]:
        """Local parameter name (as built, before `pack`) -> tensor name in the Hugging Face checkpoint."""
        return dict(self._checkpoint_names)

    def num_parameters(self) -> int:
        """Weights this stage holds, packed or not."""
        packed = sum(m.weight_numel for m in self.modules() if isinstance(m, PackedLinear))
        return packed + sum(p.numel() for p in self.parameters())

    def _names_in_checkpoint(self) -> dict[str, str]:
        names: dict[str, str] = {}
        for local, _ in self.named_parameters():
            if local.startswith("layers."):
                _, idx, rest = local.split(".", 2)
                names[local] = f"model.layers.{self.layer_range.start + int(idx)}.{rest}"
            elif local == "lm_head.weight" and self.config.tie_word_embeddings:
                names[local] = "model.embed_tokens.weight"
            elif local == "lm_head.weight":
                names[local] = "lm_head.weight"
            else:
                names[local] = f"model.{local}"
        return names

    def pack(self) -> None:
        """Lay the loaded weights out for inference (see layers.py); called once by `load`."""
        for layer in self.layers:
            typing.cast(DecoderLayer, layer).pack()
        if self.lm_head is not None:
            self.lm_head = PackedLinear([typing.cast(nn.Linear, self.lm_head)])

    def new_kv_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        p = next(self.parameters())
        c = self.config
        return PagedKVCache(len(self.layers), num_blocks, block_size, c.num_key_value_heads, c.head_dim, p.dtype, p.device)

    @torch.inference_mode()
    def forward(self, inputs: torch.Tensor, meta: AttentionMetadata, kv_cache: PagedKVCache) -> torch.Tensor:
        """inputs: token ids [T] on stage 0, hidden states [T, hidden] after -> hidden [T, hidden]."""
        x = self.embed_tokens(inputs) if self.embed_tokens is not None else inputs
        cos_sin = self.rotary.cos_sin(meta.positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos_sin, kv_cache.layer(i), meta)
        return x

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, meta: AttentionMetadata,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and LM head on each sequence's last token -> float32 logits [B, vocab]; with
        `rows` ([R] int64 sequence indices), only on those sequences' -> [R, vocab]."""
        if self.lm_head is None:
            raise RuntimeError("compute_logits runs only on the last stage")
        last = meta.last_token_indices if rows is None else meta.last_token_indices[rows]
        return self.lm_head(self.norm(hidden[last])).float()
