"""The one place the model gets its attention and pooling from."""

from crformer.ops.attention import (BACKENDS, AttentionBackend, cross_attention, memory_attention,
                                    reference_cross_attention, reference_memory_attention, resolve_backend, backend_for)
from crformer.ops.pooling import masked_pool, reference_masked_pool

__all__ = ["BACKENDS", "AttentionBackend", "cross_attention", "memory_attention", "reference_cross_attention",
           "reference_memory_attention", "resolve_backend", "backend_for",
           "masked_pool", "reference_masked_pool"]
