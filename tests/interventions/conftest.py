"""Fixtures of the intervention tests: a spy on the patched attention function."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface


@pytest.fixture
def spy():
    """`spy(patch)` -> a list that receives, for every attention call of the applied patch,
    ``{"layer", "q" (B,H,Q,D), "k", "v" (B,Hkv,K,D), "out" (B,Q,H,D)}``: the exact inputs the
    patched attention got and what it returned. Call it after `patch.apply()`.
    """

    def start(patch):
        calls = []
        inner = AttentionInterface._global_mapping[patch.name]

        def recorded(module, query, key, value, attention_mask, **kwargs):
            out, weights = inner(module, query, key, value, attention_mask, **kwargs)
            calls.append(
                {
                    "layer": patch._layer_of.get(id(module)),
                    "q": query.detach().float(),
                    "k": key.detach().float(),
                    "v": value.detach().float(),
                    "out": out.detach().float(),
                }
            )
            return out, weights

        AttentionInterface._global_mapping[patch.name] = recorded
        return calls

    return start


@pytest.fixture
def oracle():
    """Plain-attention helpers for the tests' own slow implementations of each method."""
    from types import SimpleNamespace  # noqa: PLC0415

    return SimpleNamespace(causal_mask=causal_mask, probs=probs, apply_v=apply_v)


def causal_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    """(B, K) 0/1 padding mask -> (B, 1, Q, K) bool: the last Q positions, causal, padding hidden."""
    B, K = attention_mask.shape
    rows = torch.arange(K - q_len, K).view(q_len, 1)
    see = torch.arange(K).view(1, K) <= rows
    return see.view(1, 1, q_len, K) & attention_mask.bool().view(B, 1, 1, K)


def probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention map (B, H, Q, K) in fp64, keys repeated for grouped-query heads."""
    rep = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(rep, dim=1)
    s = q.double() @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)  # padding query rows: all zero


def apply_v(a: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, Q, K) map x (B, Hkv, K, D) values -> (B, Q, H, D)."""
    rep = a.shape[1] // v.shape[1]
    return (a @ v.double().repeat_interleave(rep, dim=1)).transpose(1, 2)
