"""Per-token measures of a causal LM's logits against its fp32 reference (validation of LM
artifacts, in every runtime): KL, top-1 agreement, perplexities, the share of the adapter's effect
kept, and greedy generation compared token for token; and the plan search's KL and top-1
agreement (:func:`kl_and_top1`, :class:`LmReference`)."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Per-position KL(p ‖ q) of log-probabilities."""
    return (np.exp(p) * (p - q)).sum(-1)


def lm_fidelity(pairs: Iterable[tuple[np.ndarray, np.ndarray, list[int]]],
                bases: Iterable[np.ndarray] | None = None) -> dict:
    """Per-token KL(reference ‖ artifact) and top-1 agreement over every position, and the
    perplexity of each on the next tokens (as ``llama-perplexity --kl-divergence`` reports), and
    their ratio. With ``bases`` (the base alone's fp32 logits, per text): ``adapter_effect_kept``,
    1 − mean KL(reference ‖ artifact) / mean KL(reference ‖ base alone). ``pairs`` may be a
    generator: one text's logits are held at a time."""
    kls, top1, nll_ref, nll_art, effect = [], [], [], [], []
    bases = iter(bases) if bases is not None else None
    for ref, art, tokens in pairs:
        p, q = _log_softmax(ref), _log_softmax(art)
        kls.append(_kl(p, q))
        top1.append(ref.argmax(-1) == art.argmax(-1))
        nxt = np.asarray(tokens[1:])
        nll_ref.append(-p[np.arange(len(nxt)), nxt])
        nll_art.append(-q[np.arange(len(nxt)), nxt])
        if bases is not None:
            effect.append(_kl(p, _log_softmax(next(bases))))
    kl = np.concatenate(kls)
    ppl_ref, ppl_art = float(np.exp(np.concatenate(nll_ref).mean())), float(np.exp(np.concatenate(nll_art).mean()))
    out = {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
           "top1_agreement": float(np.concatenate(top1).mean()), "ppl_reference": ppl_ref, "ppl_artifact": ppl_art,
           "ppl_ratio": ppl_art / ppl_ref, "tokens": int(kl.size)}
    if effect:
        moved = float(np.concatenate(effect).mean())
        out["adapter_effect_kept"] = 1.0 - out["kl_mean"] / moved if moved > 0 else float("nan")
    return out


GREEDY_TOKENS, GREEDY_PROMPTS, GREEDY_PROMPT_TOKENS = 32, 4, 16


@torch.no_grad()
def torch_greedy(model, tokens: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``tokens`` from the PyTorch model, through its KV cache (no stop)."""
    import inspect

    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # transformers 5 / 4
    out = model(torch.tensor([tokens]), use_cache=True)
    got = [int(out.logits[0, -1].argmax())]
    while len(got) < n:
        out = model(torch.tensor([got[-1:]]), use_cache=True, **{key: getattr(out, key)})
        got.append(int(out.logits[0, -1].argmax()))
    return got


def greedy_match(session, adapter: str | None, reference_model, token_lists: list[list[int]]) -> float:
    """Share of the first eval prompts (their first 16 tokens) whose first 32 greedy tokens in
    the runtime equal the fp32 reference's."""
    prompts = [t[:GREEDY_PROMPT_TOKENS] for t in token_lists[:GREEDY_PROMPTS]]
    same = [session.greedy(p, adapter, GREEDY_TOKENS) == torch_greedy(reference_model, p, GREEDY_TOKENS)
            for p in prompts]
    return sum(same) / len(same)


@torch.no_grad()
def lm_reference(model, token_lists: list[list[int]]) -> list[np.ndarray]:
    return [model(torch.tensor([t])).logits[0].float().numpy() for t in token_lists]


def kl_and_top1(reference: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    """Per-token KL(reference ‖ got) and top-1 agreement of logits [tokens, vocab] (torch
    tensors, per batch), as the plan search compares a plan with its reference: in float64 from
    the logit differences δ = got − reference: KL = log E_p[e^δ] − E_p[δ], p the reference's softmax.
    Log-probs in float32 would not do: their rounding alone (~1e-6 at −20) averages to a KL of
    ~1e-8, the size of an 8-bit plan's error."""
    kl, top1 = [], []
    for r, g in zip(reference, got):
        for i in range(0, r.shape[0], 64):
            p = torch.softmax(r[i:i + 64].double(), -1)
            d = g[i:i + 64].double() - r[i:i + 64].double()
            kl.append(torch.log1p((p * torch.expm1(d)).sum(-1)) - (p * d).sum(-1))
        top1.append((r.argmax(-1) == g.argmax(-1)).double())
    return {"kl_mean": float(torch.cat(kl).mean()), "top1_agreement": float(torch.cat(top1).mean())}


class LmReference:
    """The reference logits of a plan search, kept for the many comparisons against them: per
    token only the vocabulary entries whose reference probability exceeds ``floor`` (Gemma 3 on
    its calibration texts: ~19% of 262,144 at 1e-12, the rest holding < 3e-8 of the mass), the
    KL computed as in :func:`kl_and_top1` over them, renormalized (off from the full sum by
    about the mass left out, relatively)."""

    def __init__(self, reference: list[torch.Tensor], floor: float = 1e-12):
        self.reference = reference
        self.parts = []
        for r in reference:
            for i in range(0, r.shape[0], 64):
                p = torch.softmax(r[i:i + 64].double(), -1)
                rows, cols = torch.nonzero(p > floor, as_tuple=True)
                flat = rows * r.shape[1] + cols
                kept = p[rows, cols]
                total = torch.zeros(p.shape[0], dtype=torch.float64).index_add_(0, rows, kept)
                self.parts.append((flat, rows, kept / total[rows], r[i:i + 64].reshape(-1)[flat].double()))

    def compare(self, got: list[torch.Tensor]) -> dict:
        kl, top1, k = [], [], 0
        for r, g in zip(self.reference, got):
            for i in range(0, r.shape[0], 64):
                flat, rows, p, ref = self.parts[k]
                k += 1
                d = g[i:i + 64].reshape(-1)[flat].double() - ref
                n = min(64, r.shape[0] - i)
                e1 = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, p * torch.expm1(d))
                e0 = torch.zeros(n, dtype=torch.float64).index_add_(0, rows, p * d)
                kl.append(torch.log1p(e1) - e0)
            top1.append((r.argmax(-1) == g.argmax(-1)).double())
        return {"kl_mean": float(torch.cat(kl).mean()), "top1_agreement": float(torch.cat(top1).mean())}
