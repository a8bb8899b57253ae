"""Pure-PyTorch reference of the parameter tables: the CPU path and the oracle for every kernel.

It materialises the attention map in fp32, a block of query rows at a time,
so it is exact and slow. Shapes follow transformers' attention interface:
query (B, H, Q, D), key/value (B, Hkv, K, D), output (B, Q, H, D).
"""

from __future__ import annotations

import torch

from attnedit.tables import LayerTables

# Rows per block: bounds the fp32 map at about 64M elements per block.
_MAX_BLOCK_ELEMS = 1 << 26


def _logits(q: torch.Tensor, k: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    """(B, H, q, D) x (B, Hkv, K, D) -> (B, H, q, K) fp32, grouped-query attention without repeating K."""
    B, H, Q, D = q.shape
    Hkv = k.shape[1]
    qg = q.float().reshape(B, Hkv, H // Hkv, Q, D)  # (B, Hkv, R, Q, D)
    s = torch.einsum("bgrqd,bgkd->bgrqk", qg, k.float()).reshape(B, H, Q, k.shape[2]) * scaling
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    return s


def _apply_v(p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, H, q, K) x (B, Hkv, K, D) -> (B, H, q, D) fp32."""
    B, H, Q, K = p.shape
    Hkv = v.shape[1]
    o = torch.einsum("bgrqk,bgkd->bgrqd", p.reshape(B, Hkv, H // Hkv, Q, K), v.float())
    return o.reshape(B, H, Q, v.shape[-1])


def _key_bias(tables: LayerTables, B: int, H: int, K: int) -> torch.Tensor | None:
    """(B, H, K) logit bias of every key, or None."""
    if tables.bias is None:
        return None
    bias = tables.bias.to(torch.float32)
    if tables.key_group is None:
        return bias[:, 0].view(1, H, 1).expand(B, H, K)
    idx = tables.key_group.long().expand(B, H, K)
    return torch.gather(bias.to(idx.device).view(1, H, -1).expand(B, H, -1), 2, idx)


def _group_onehot(tables: LayerTables, B: int, H: int, K: int) -> torch.Tensor:
    """(B, Hg, K, G) fp32 one-hot of key groups."""
    return torch.nn.functional.one_hot(tables.key_group.long(), tables.n_groups).float()


def _mask_sum(masses: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum the (…, G) masses over the groups whose bit is set in `groups`."""
    sel = torch.tensor([(groups >> g) & 1 for g in range(masses.shape[-1])], dtype=masses.dtype, device=masses.device)
    return masses @ sel


def move_coefficients(masses: torch.Tensor, tables: LayerTables, q_pos: torch.Tensor) -> torch.Tensor:
    """Per-group multipliers c_g of each row after all moves.

    Args:
        masses: (B, H, q, G) attention mass of each group in each row (rows sum to 1 or 0).
        tables: the layer's tables.
        q_pos: (q,) absolute positions of the rows (for row starts).
    Returns:
        (B, H, q, G) multipliers; the new map is A_ij * c[group(j)].
    """
    B, H, Q, G = masses.shape
    c = torch.ones_like(masses)
    for mv in tables.moves:
        cur = masses * c
        src = _mask_sum(cur, mv.src)
        dst = _mask_sum(cur, mv.dst)
        keep = mv.keep.to(masses.device, masses.dtype).view(1, H, 1)
        active = (dst > 0) & (keep != 1)
        if mv.gate is not None:
            num_g, den_g, max_ratio, min_den = mv.gate
            num = _mask_sum(cur, num_g)
            den = _mask_sum(cur, den_g)
            active &= (den >= min_den) & (den > 0) & (num <= max_ratio * den)
        if mv.row_start is not None:
            active &= q_pos.view(1, 1, Q) >= mv.row_start.to(masses.device).view(B, 1, 1)
        freed = (1 - keep) * src
        f_src = torch.where(active, keep.expand_as(src), torch.ones_like(src))
        f_dst = torch.where(active, 1 + freed / dst.clamp_min(1e-30), torch.ones_like(dst))
        src_sel = torch.tensor([(mv.src >> g) & 1 for g in range(G)], dtype=torch.bool, device=masses.device)
        dst_sel = torch.tensor([(mv.dst >> g) & 1 for g in range(G)], dtype=torch.bool, device=masses.device)
        c = torch.where(src_sel, c * f_src[..., None], c)
        c = torch.where(dst_sel, c * f_dst[..., None], c)
    return c


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tables: LayerTables | None,
    *,
    scaling: float,
    mask: torch.Tensor | None = None,
    softcap: float | None = None,
    q_start: int | None = None,
    return_weights: bool = False,
    return_masses: bool = False,
):
    """Attention with the layer's tables applied.

    Args:
        q: (B, H, Q, D); k, v: (B, Hkv, K, D).
        tables: the layer's runtime tables (None: plain attention).
        scaling: logit scale.
        mask: (B, 1|H, Q, K) bool, True = may attend; None = causal, last row aligned to the last key.
        softcap: optional logit soft-capping (Gemma 2).
        q_start: absolute position of query row 0 (for rows gated by position), an int or a 0-d tensor;
            default K - Q.
        return_weights: also return the edited map (B, H, Q, K) fp32.
        return_masses: also return the per-group masses before moves (B, H, Q, G).
    Returns:
        out (B, Q, H, D) in q's dtype, then the requested extras, in order.
    """
    B, H, Q, D = q.shape
    K = k.shape[2]
    q_start = K - Q if q_start is None else q_start
    block = max(1, min(Q, _MAX_BLOCK_ELEMS // max(1, B * H * K)))
    bias = _key_bias(tables, B, H, K) if tables is not None else None
    onehot = _group_onehot(tables, B, H, K) if tables is not None and tables.key_group is not None else None
    outs, weights, masses_out = [], [], []
    for q0, nq, see, p in _row_blocks(q, k, bias, mask, block, scaling, softcap):
        if tables is not None and onehot is not None and (tables.moves or return_masses):
            m = torch.einsum("bhqk,bhkg->bhqg", p, onehot.expand(B, H, K, -1))
            if return_masses:
                masses_out.append(m)
            if tables.moves:
                q_pos = torch.arange(nq, device=q.device) + (q_start + q0)  # q_start may be a device scalar
                c = move_coefficients(m, tables, q_pos)
                p = p * torch.einsum("bhqg,bhkg->bhqk", c, onehot.expand(B, H, K, -1))
        elif return_masses:
            masses_out.append(p.sum(-1, keepdim=True))
        o = _apply_v(p, v)
        if tables is not None and tables.out_scale is not None:
            sc = tables.out_scale.to(o.device, torch.float32)
            o = o * (sc.view(1, H, 1, 1) if sc.dim() == 1 else sc.view(B, H, 1, 1))
        if tables is not None and tables.out_shift is not None:
            o = o + tables.out_shift.to(o.device, torch.float32).view(1, H, 1, D)
        outs.append(o)
        if return_weights:
            weights.append(p)
    out = torch.cat(outs, dim=2).transpose(1, 2).to(q.dtype).contiguous()
    extras = []
    if return_weights:
        extras.append(torch.cat(weights, dim=2))
    if return_masses:
        extras.append(torch.cat(masses_out, dim=2))
    return (out, *extras) if extras else out


def _row_blocks(q, k, bias, mask, block: int, scaling: float, softcap: float | None):
    """Blocks of query rows: (first row, rows, visibility (B, 1|H, rows, K), softmax of the biased logits).

    The causal default aligns the last query row with the last key. Fully masked rows give 0, as flash
    kernels do.
    """
    Q, K = q.shape[2], k.shape[2]
    for q0 in range(0, Q, block):
        qb = q[:, :, q0 : q0 + block]
        nq = qb.shape[2]
        s = _logits(qb, k, scaling, softcap)
        if bias is not None:
            s = s + bias[:, :, None, :]
        if mask is not None:
            see = mask[:, :, q0 : q0 + nq]
        else:
            rows = torch.arange(q0, q0 + nq, device=q.device)[:, None] + (K - Q)
            see = (torch.arange(K, device=q.device)[None, :] <= rows)[None, None]
        yield q0, nq, see, torch.softmax(s.masked_fill(~see, float("-inf")), dim=-1).nan_to_num(0.0)


def column_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    tables: LayerTables | None,
    *,
    scaling: float,
    mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column sums of the (biased, unmoved) attention map and how many rows see each key.

    Returns:
        colsum (B, H, K) fp32: sum_i A_ij over this call's query rows;
        count  (B, 1|H, K) fp32: the number of rows that may see key j.
        ACT's sink score is colsum / count.
    """
    B, H, Q, D = q.shape
    K = k.shape[2]
    block = max(1, min(Q, _MAX_BLOCK_ELEMS // max(1, B * H * K)))
    bias = _key_bias(tables, B, H, K) if tables is not None else None
    colsum = torch.zeros(B, H, K, device=q.device)
    count = torch.zeros(B, 1 if mask is None else mask.shape[1], K, device=q.device)
    for _, _, see, p in _row_blocks(q, k, bias, mask, block, scaling, softcap):
        colsum += p.sum(2)
        count += see.float().sum(2).expand(count.shape[0], count.shape[1], K)
    return colsum, count
