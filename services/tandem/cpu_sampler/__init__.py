"""The cpu-sampler service: per-sequence sampling state; logits rows in, tokens out.

`serve(config)` starts a replica; the sampling itself is `tandem.core.sampling.reference`.
"""

from tandem.cpu_sampler.config import SamplerConfig
from tandem.cpu_sampler.servicer import SERVICE_NAME, serve

__all__ = ["SERVICE_NAME", "SamplerConfig", "serve"]
