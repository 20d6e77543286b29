"""The building blocks of a Llama-family decoder layer.

Modules are built with Hugging Face's parameter names so that checkpoints load as they are;
`pack()` then stacks the projections that read the same input (q, k, v; gate, up) into one
PackedLinear each and drops the originals. A layer runs only once packed.
"""

from __future__ import annotations

import typing

import torch
import torch.nn.functional as F
from torch import nn

from tandem.core.modeling.attention import AttentionMetadata, attend
from tandem.core.modeling.linear import PackedLinear
from tandem.core.modeling.model_config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the input dtype, as the reference does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = c.head_dim**-0.5
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj: nn.Module = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.o_bias)

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],  # this layer's (keys, values) [slots, kv_heads, head_dim]
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, (heads + 2 * kv_heads) * head_dim]
        return self.o_proj(attend(qkv, cos_sin, *kv, meta, self.num_heads, self.scale))

    def pack(self) -> None:
        self.qkv_proj = PackedLinear([self.q_proj, self.k_proj, self.v_proj])
        self.o_proj = PackedLinear([typing.cast(nn.Linear, self.o_proj)])
        del self.q_proj, self.k_proj, self.v_proj


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj: nn.Module = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj.split(self.gate_up_proj(x))
        return self.down_proj(F.silu(gate).mul_(up))

    def pack(self) -> None:
        self.gate_up_proj = PackedLinear([self.gate_proj, self.up_proj])
        self.down_proj = PackedLinear([typing.cast(nn.Linear, self.down_proj)])
        del self.gate_proj, self.up_proj


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))

    def pack(self) -> None:
        self.self_attn.pack()
        self.mlp.pack()
