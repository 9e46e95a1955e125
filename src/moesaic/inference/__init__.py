"""Inference: generation with a static KV cache and continuous batching (``generate``, ``complete``,
``DecodeSession``), and MoE decoding strategies. docs/inference.md."""

from moesaic.inference.generate import Completion, complete, generate
from moesaic.inference.kv_cache import CacheView, StaticKVCache
from moesaic.inference.sampling import SamplingParams
from moesaic.inference.session import CapacityError, DecodeSession, TokenEvent
from moesaic.inference.stop import StopTextStream

__all__ = ["CacheView", "CapacityError", "Completion", "DecodeSession", "SamplingParams", "StaticKVCache",
           "StopTextStream", "TokenEvent", "complete", "generate"]
