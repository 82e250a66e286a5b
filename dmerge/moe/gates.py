"""Router (gate) rows of a FrankenMoE, and how well they route: pure tensor math.

Notation, for one layer ``i``: an expert ``e`` has positive prompts ``P_e`` and
(optionally) negative prompts ``N_e``; ``normalize(v) = v / max(||v||_2, 1e-8)``.

* ``hidden`` (mergekit-moe's definition): ``h_i(p)`` is the residual stream entering
  layer ``i`` (transformers' ``hidden_states[i]``) at the last token of prompt ``p``
  (prompts are left-padded, so that is the last real token);
  ``row_e = normalize(mean_{p in P_e} h_i(p) - mean_{p in N_e} h_i(p))`` (no ``N_e``: no
  subtraction).
* ``cheap_embed``: ``E(S)`` = sum of the token embeddings of every real token of every
  prompt of ``S``; ``row_e = normalize(normalize(E(P_e)) - normalize(E(N_e)))`` (without
  negatives, ``normalize(E(P_e))``), the same in every layer.
* ``random``: N(0, 1) entries; ``uniform_random``: U(-1/sqrt(H), 1/sqrt(H)) (torch's
  ``nn.Linear`` initialisation), from a generator seeded by (seed, layer).
* ``router_input`` (dmerge's): ``x_i(p)`` = the input of layer ``i``'s MoE block (the
  output of its post-attention norm: what the router is multiplied with, token by token,
  in the built model), averaged over the real tokens of ``p``. With
  ``m_e = mean_{P_e} x_i``, ``c = mean_e m_e`` over the routed experts and ``u =
  normalize(c)``: ``d_e = m_e - mean_{N_e} x_i`` (no ``N_e``: ``m_e - c``) and
  ``row_e = normalize(d_e - (d_e . u) u)``. Every prompt shares a large common part
  ``c``; a router has no bias, so a row that keeps any of ``c`` adds a constant to its
  expert's logit for every token (mergekit's ``hidden`` rows do, which is why an expert
  with negative prompts loses to the others): projecting ``u`` out leaves only what
  tells the experts apart. Shared experts' gate rows are ``normalize(m_s - mean_{N_s})``.

The routing share: for held-out prompts of expert ``e``, the router logits of every real
token are ``W_i x_i(token)``; a prompt is routed top-1 to ``argmax`` of its logits
averaged over its real tokens (the same as the logits of its mean input, by linearity).
"""

from __future__ import annotations

import math

import torch

EPS = 1e-8


def normalize(v: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (rows of zeros stay zero)."""
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=EPS)


def last_token(h: torch.Tensor) -> torch.Tensor:
    """``[prompts, tokens, hidden]`` -> the last position of each prompt (left padding)."""
    return h[:, -1, :]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[prompts, tokens, hidden]`` -> the mean over each prompt's real tokens (mask 1)."""
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1).clamp(min=1)


def contrast_rows(per_prompt: torch.Tensor, groups: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """One row per (positive, negative) group of prompt indices: the mean of the
    positives minus the mean of the negatives (if any), normalised."""
    rows = []
    for pos, neg in groups:
        v = per_prompt[pos].mean(dim=0)
        if neg:
            v = v - per_prompt[neg].mean(dim=0)
        rows.append(v)
    return normalize(torch.stack(rows))


def centered_rows(per_prompt: torch.Tensor, groups: list[tuple[list[int], list[int]]], n_routed: int) -> torch.Tensor:
    """``router_input`` rows (see the module docstring): the routed experts' contrasts
    with the common part of their prompts projected out; shared experts' plain contrasts."""
    means = torch.stack([per_prompt[pos].mean(dim=0) for pos, _ in groups])
    common = means[:n_routed].mean(dim=0)
    u = normalize(common)
    rows = []
    for k, (pos, neg) in enumerate(groups):
        if k >= n_routed:
            d = means[k] - (per_prompt[neg].mean(dim=0) if neg else 0)
        else:
            d = means[k] - (per_prompt[neg].mean(dim=0) if neg else common)
            d = d - (d @ u) * u
        rows.append(d)
    return normalize(torch.stack(rows))


def cheap_embed_rows(embedded: torch.Tensor, mask: torch.Tensor,
                     groups: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """``cheap_embed`` rows from the prompts' token embeddings ``[prompts, tokens, hidden]``."""
    summed = (embedded * mask.to(embedded.dtype).unsqueeze(-1)).sum(dim=1)  # per prompt
    rows = []
    for pos, neg in groups:
        v = normalize(summed[pos].sum(dim=0))
        if neg:
            v = v - normalize(summed[neg].sum(dim=0))
        rows.append(v)
    return normalize(torch.stack(rows))


def random_rows(mode: str, n: int, hidden: int, seed: int, layer: int) -> torch.Tensor:
    """``random`` / ``uniform_random`` rows of one layer, the same however the work is split."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + layer) % (2**63))
    if mode == "random":
        return torch.randn((n, hidden), generator=g)
    scale = math.sqrt(1.0 / hidden)
    return torch.rand((n, hidden), generator=g) * 2 * scale - scale


def routed_top1(rows: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The expert each prompt goes to top-1: ``argmax`` of the router logits averaged
    over its real tokens. ``rows`` ``[experts, hidden]``, ``x`` ``[prompts, tokens, hidden]``."""
    logits = x @ rows.to(x.dtype).T  # [prompts, tokens, experts]
    return masked_mean(logits, mask).argmax(dim=-1)


def max_row_cosine(rows: torch.Tensor) -> tuple[float, tuple[int, int]]:
    """The largest cosine between two different rows, and which rows."""
    n = rows.shape[0]
    if n < 2:
        return 0.0, (0, 0)
    c = normalize(rows.double()) @ normalize(rows.double()).T
    c.fill_diagonal_(-2.0)
    k = int(c.argmax())
    return float(c.view(-1)[k]), (k // n, k % n)
