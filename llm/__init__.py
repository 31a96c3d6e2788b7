"""LLM generation above the API: a compiled prefill / decode step over an explicit KV cache (:mod:`.generator`)
and sampling on the device without host synchronisation (:mod:`.sampling`)."""
from .generator import Generator, from_hf
from .sampling import SamplingParams

__all__ = ["Generator", "from_hf", "SamplingParams"]
