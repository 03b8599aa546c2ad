"""Where Gemma 3's attention goes, per layer, on one text (<bos> + 1,023 tokens, fp16 pass): the mass on <bos> and on
the first 4 tokens (the fp16 sinks) for queries at positions 8-499, on <bos> for queries at 600-1023 (a sliding
layer's window has dropped it by then), their largest weight and entropy; the 8 keys that receive the most mass
from those late queries and the RMS logit error of the 3.5-bit klt plan on them against all pairs; and the
attention output's relative error with klt-coded keys, alone and with the 16 most-attended keys kept exact (is a
handful of heavy tokens worth keeping in fp16?).

    python benchmarks/gemma_attention_mass.py [TEXT] > LOG
"""
import sys

import mlx.core as mx
import numpy as np

from gemma_layer_error import capture, coded, attend, PROFILE
from kvshard.quant import KVCacheBuilder, load_profile
from kvshard.quant.eval import load_text
from kvshard.quant.models import load_model
from kvshard.quant.sliding import sliding_windows

text = sys.argv[1] if len(sys.argv) > 1 else "pride_and_prejudice"
model, tok = load_model("gemma3-270m")
profile = load_profile(PROFILE)
ids = mx.array([tok.bos_token_id] + tok.encode(load_text(text), add_special_tokens=False)[:1023])
cap = capture(model, ids)
windows = sliding_windows(model)
cfg = profile.config(3.5, sliding="full")
T = 1024
pos = mx.arange(T)
for i, (q, k, v, scale) in enumerate(cap):
    w = windows[i]
    allowed = pos[:, None] >= pos[None]
    if w is not None:
        allowed = allowed & (pos[:, None] < pos[None] + w)
    out, scores = attend(q, k, v, scale, allowed)
    p = mx.softmax(scores, axis=-1)  # (1, 4, T, T)
    pn = np.array(p[0])
    late = slice(600, T)
    early = slice(8, 500)
    bos_early = pn[:, early, 0].mean()
    bos_late = pn[:, late, 0].mean()
    first4_early = pn[:, early, :4].sum(-1).mean()
    mx_late = pn[:, late].max(-1).mean()
    # received mass per key over late queries, top keys
    recv = pn[:, late].sum(axis=(0, 1))
    top = np.argsort(recv)[::-1][:8]
    # relative position of the argmax key in late queries
    am = pn[:, late].argmax(-1)
    rel = (np.arange(600, T)[None] - am)
    # coded keys
    cache = KVCacheBuilder.for_model(model, cfg)[i]
    k_hat, v_hat, nb = coded(cache, k, v)
    diff = np.array(mx.where(allowed, scale * (q @ mx.repeat(k_hat, 4, axis=1).swapaxes(-1, -2)) - scores, 0.0)[0])
    a = np.array(allowed)
    rms_all = np.sqrt((diff ** 2).sum() / (a.sum() * 4))
    # error on the top-received keys vs others (late queries)
    dl = diff[:, late]
    al = a[late]
    rms_top = np.sqrt((dl[:, :, top] ** 2).sum() / (al[:, top].sum() * 4))
    # oracle: top-16 received keys exact
    out_k, _ = attend(q, k_hat, v, scale, allowed)
    recv_all = pn.sum(axis=(0, 1))
    heavy = np.argsort(recv_all)[::-1][:16]
    kh = np.array(k_hat); kh[:, :, heavy] = np.array(k)[:, :, heavy]
    out_o, _ = attend(q, mx.array(kh), v, scale, allowed)
    nrm = float(mx.sqrt((out * out).sum()).item())
    e_k = float(mx.sqrt(((out_k - out) ** 2).sum()).item()) / nrm
    e_o = float(mx.sqrt(((out_o - out) ** 2).sum()).item()) / nrm
    ent = -(pn * np.log(pn + 1e-30)).sum(-1)[:, late].mean()
    lstd = np.array(mx.where(allowed, scores, 0))[0][:, late].std()
    print(f"L{i:2d} w={w} bos_e={bos_early:.2f} first4_e={first4_early:.2f} bos_l={bos_late:.2f} max_l={mx_late:.2f} ent_l={ent:.2f} "
          f"relpos_med={np.median(rel):.0f} top={sorted(top.tolist())} rms={rms_all:.3f} rms_top={rms_top:.3f} "
          f"outerr_k={e_k:.3f} oracle16={e_o:.3f} heavy={sorted(heavy.tolist())[:10]}", flush=True)
