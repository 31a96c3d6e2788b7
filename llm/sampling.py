"""Token sampling for one decode step: greedy, temperature, top-k, top-p, per row.

logits [B, V] -> token ids int64 [B], on the logits' device, with no host sync (no ``.item()``, no
Python branch on a tensor's value), so that a decode step that ends in ``sample_rows`` can be
captured in a CUDA graph. Filtering follows Hugging Face's warpers, in their order: temperature,
then top-k (``TopKLogitsWarper``: ties with the k-th logit survive), then top-p
(``TopPLogitsWarper``: the smallest set of most likely tokens whose mass reaches top_p, the token that
crosses the threshold included).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    seed: int | None = None  # seeds the generator ``make_generator`` builds

    def __post_init__(self):
        """Refuse values outside the allowed ranges with a ``kiln.InputError`` (a ValueError) naming the field."""
        t, k, p = self.temperature, self.top_k, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t >= 0):
            raise InputError(f"temperature={t!r}: must be a finite number >= 0", hint="0 is greedy (argmax); 0.6 - 1.0 samples")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InputError(f"top_k={k!r}: must be an int >= 0", hint="0 switches top-k off; k keeps the k most likely tokens")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0 < p <= 1):
            raise InputError(f"top_p={p!r}: must be in (0, 1]", hint="1.0 switches top-p off; 0.9 keeps the most likely "
                             "tokens that make up 90% of the probability")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise InputError(f"seed={self.seed!r}: must be an int or None", hint="None draws fresh noise every request")


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator seeded with ``params.seed`` (None when unseeded). Make it once per request and pass
    it to every step: reseeding each step would reuse the same noise."""
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p per row: float32 logits [B, V] with dropped tokens set to -inf.

    ``logits`` are already divided by the temperature; top_k [B] (0 = off, >= V = all),
    top_p [B] in (0, 1] (1 = off). Give top_p in float64 for HF's exact thresholds: a float32 top_p
    is already rounded (0.8 -> 0.80000001), which moves a boundary that the mass meets exactly."""
    x = logits.float()
    V = x.shape[-1]
    # Ascending, as HF sorts for top-p: its cumsum adds the small tail first, and the same numerics
    # give the same survivors at a threshold (e.g. [0.5, 0.3, 0.15, 0.05] at top_p=0.5 keeps {0}).
    srt, order = x.sort(dim=-1)  # [B, V], the top token last
    k = torch.where(top_k > 0, top_k, V).clamp(1, V).to(device=x.device, dtype=torch.int64)
    kth = srt.gather(-1, (V - k).unsqueeze(-1))  # [B, 1]; ">= k-th logit", not "rank < k": HF's ties
    srt = srt.masked_fill(srt < kth, -math.inf)
    cum = srt.softmax(dim=-1).cumsum(dim=-1)  # renormalised over the top-k survivors, as HF's TopP sees them
    # Dropping cum <= 1 - top_p keeps the token that crosses top_p. 1 - top_p in float64 then rounded,
    # as HF's Python-float threshold is; top_p = 1 drops only zero-probability tokens.
    floor = (1 - top_p.to(device=x.device, dtype=torch.float64)).to(torch.float32).unsqueeze(-1)  # [B, 1]
    drop = cum <= floor
    drop[..., -1] = False  # the top token always stays (HF's min_tokens_to_keep=1)
    srt = srt.masked_fill(drop, -math.inf)
    return torch.empty_like(x).scatter_(-1, order, srt)  # back to vocabulary order


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row, each row with its own params: logits [B, V], temperature [B] float
    (0 = greedy), top_k [B] int (0 = off), top_p [B] float, float64 best (1 = off) -> int64 [B].

    Values are not checked here (that would sync); build them from validated ``SamplingParams``."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    B = logits.shape[0]
    for name, t in (("temperature", temperature), ("top_k", top_k), ("top_p", top_p)):
        if tuple(t.shape) != (B,):
            raise ValueError(f"{name} must have shape ({B},), got {tuple(t.shape)}")
    x = logits.float()  # [B, V]
    greedy = x.argmax(dim=-1)  # first maximum on ties, like torch.argmax everywhere
    t = temperature.to(device=x.device, dtype=torch.float32)
    x = x / torch.where(t > 0, t, 1.0).unsqueeze(-1)  # greedy rows get 1 only to stay finite
    probs = filter_logits(x, top_k, top_p).softmax(dim=-1)  # [B, V], 0 where filtered out
    # Exponential race: with E_i ~ Exp(1) independent, E_i / p_i ~ Exp(p_i) and the smallest of them
    # is token i with probability p_i, so argmax(p / E) draws from p, no normalisation needed.
    # torch.multinomial would do the same draw but first validates its input with .item() (ATen's
    # multinomial_out), a host sync that also breaks CUDA-graph capture. E is clamped above 0 so a
    # filtered token (p = 0) scores 0, never NaN, and always loses to the top token (p > 0).
    noise = torch.empty_like(probs).exponential_(1.0, generator=generator).clamp_min_(torch.finfo(torch.float32).tiny)
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(t > 0, sampled, greedy)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row, every row with ``params``: logits [B, V] (any float dtype) -> int64 [B].

    Without a ``generator``, a seeded ``params`` draws from a fresh generator made from its seed (the
    same draw every call); a decode loop should make one with ``make_generator`` and pass it."""
    if params.temperature == 0:  # a branch on host params, not on tensor values
        return logits.argmax(dim=-1)  # (in the logits' dtype: widening is exact, so the same token, one kernel fewer)
    if generator is None:
        generator = make_generator(params, logits.device)
    B, dev = logits.shape[0], logits.device
    return sample_rows(logits, torch.full((B,), float(params.temperature), device=dev),
                       torch.full((B,), params.top_k, device=dev, dtype=torch.int64),
                       torch.full((B,), float(params.top_p), device=dev, dtype=torch.float64), generator)
