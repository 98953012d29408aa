"""Plain numpy implementation of the sparse-prefill estimate, written from the spec (qwen25_1m.md section 3
and Qwen's dual-chunk backend), one (row, segment, head) at a time: the oracle for the JAX estimate."""

import numpy as np

LAST_Q = 64


def rope_np(x, pos, inv):
    """Rotate x [T, H] (float64) to positions pos [T] with inverse frequencies inv [H/2] (rotate_half)."""
    H = x.shape[-1]
    ang = pos[:, None].astype(np.float64) * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    x1, x2 = x[:, :H // 2], x[:, H // 2:]
    return x * cos + np.concatenate([-x2, x1], -1) * sin


def scores_head(q_rows, keys, end, P, *, S, C, scale, inv):
    """q_rows [n, H]: the segment's last n queries (unrotated, positions end-n..end-1); keys [end, H]
    (rotated with p mod S and scaled, as cached). Returns (vertical [end], slash [end]) before forcing,
    slash indexed by i = end - 1 - d."""
    n = q_rows.shape[0]
    pos = np.arange(end - n, end)
    k = np.arange(end)
    logits = np.empty((n, end))
    for shift, sel in ((C, k < P - S), (S, (k >= P - S) & (k < P)), (0, k >= P)):
        qr = rope_np(q_rows, pos - P + shift, inv)
        logits[:, sel] = (qr @ keys[sel].T) * scale
    logits = np.where(k[None] <= pos[:, None], logits, -np.inf)
    a = np.exp(logits - logits.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    vertical = a.sum(0)
    slash = np.zeros(end)                     # index i = end - 1 - d
    for r in range(n):
        for kk in range(pos[r] + 1):
            slash[end - 1 - (pos[r] - kk)] += a[r, kk]
    return vertical, slash


def select_head(vertical, slash, begin, end, P, *, S, vertical_size, slash_size):
    """Top-k and the split by phase. Returns per phase (inter, successive, intra): (sorted columns,
    sorted distances)."""
    vertical, slash = np.array(vertical[:end], np.float64), np.array(slash[:end], np.float64)
    vertical[:30] = np.inf
    # the forced diagonals first, nearest to the main one first (a budget under 100 keeps d = 0, 1, ...), then the
    # others by score, ties to the lower index
    forced = np.arange(max(0, end - 100), end)[::-1]
    slash[forced] = np.inf
    vs = 130 if vertical_size == 30 else vertical_size
    nv = min(max(vs, 30), end)
    ns = min(max(slash_size, 50), end)
    cols = np.argsort(-vertical, kind="stable")[:nv]
    rest = [i for i in np.argsort(-slash, kind="stable") if i < end - 100]
    diag_i = np.concatenate([forced, np.asarray(rest, int)])[:ns]
    L = end - begin
    out = []
    for p in range(3):                         # inter, successive, intra
        has = [P >= 2 * S, P >= S, True][p]
        if not has:
            out.append((np.zeros(0, int), np.zeros(0, int)))
            continue
        c_in = [cols < P - S, (cols >= P - S) & (cols < P), cols >= P][p]
        d_in = [diag_i < P - S + L, (diag_i >= P - S) & (diag_i < P + L), diag_i >= P][p]
        c = np.sort(cols[c_in])
        d = np.sort(end - 1 - diag_i[d_in])
        length = [P - S, S, end - P][p]
        fb = (np.arange(5) * length) // 5 if length >= 5 else np.arange(length)
        if c.size == 0:
            c = [0, P - S, P][p] + fb
        if d.size == 0 and p < 2:
            d = np.sort(fb + [begin - P + S, begin - P][p])
        out.append((c, d))
    return out
