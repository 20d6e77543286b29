"""Linear projections laid out once for the fastest kernel of their device.

On CPU, torch's `F.linear` in float32 goes to MKL, which on the AMD cores this project runs on
takes a slower path than oneDNN's AVX-512 kernels (timed alone at one thread, 32 rows: 57-70
against 90-97 GFLOP/s on the projections of a 512-wide Llama, 29 against 70 on its 32,000-row LM
head; on an AVX2-only EPYC, 56-59 against 60-66 and 30 against 49). So on CPU the
weight is reordered once into oneDNN's blocked layout and every call goes to oneDNN. On other
devices the weight is used as it is.

Several projections that read the same input (q, k, v; gate, up) become one matmul with their
weights stacked, so each reads its input once and the kernel sees one larger problem.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

# Rows the CPU weight layout is tuned for; any row count works with it.
_ROWS_HINT = 32


def _onednn_linear_available(weight: torch.Tensor) -> bool:
    """oneDNN takes float32 on any x86 CPU, bfloat16 only where the CPU converts it natively
    (AVX-512 BW/VL/DQ or AVX-NE-CONVERT); elsewhere bfloat16 goes to torch's own kernel."""
    if not (weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return False
    return weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16
                                             and torch.ops.mkldnn._is_mkldnn_bf16_supported())


class PackedLinear(nn.Module):
    """y = x W^T (+ b), x [T, in] -> [T, out], with W stacked from one or more nn.Linear."""

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        weight = torch.cat([lin.weight.detach() for lin in linears])
        biases = [lin.bias for lin in linears]
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() if b is not None else weight.new_zeros(lin.out_features)
                              for b, lin in zip(biases, linears)])
        else:
            bias = None
        self.out_sizes = [lin.out_features for lin in linears]
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight_numel = weight.numel() + (bias.numel() if bias is not None else 0)
        self.bias = bias
        self.is_onednn = _onednn_linear_available(weight)
        # oneDNN's blocked layout is an opaque tensor: kept as a plain attribute, not a parameter.
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _ROWS_HINT) if self.is_onednn else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_onednn:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The output of each stacked projection, as views of `y` [T, out]."""
        return y.split(self.out_sizes, dim=-1)
