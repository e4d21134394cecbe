"""Replay KF-RTRL training from a checkpoint at a pass start (Adam lr 0.01, clip 1.0, as the run):
per update the gradient norm, the sensitivity norms ||A||, ||u|| and the recurrent weights'
spectral radius. Usage: python train_diag.py CHECKPOINT DATA_BIN UPDATES"""

import sys

import torch
from fairseq.data import Dictionary, data_utils

from atbptt.estimators import KfRtrl, TanhRnn
from atbptt.estimators.base import trainable

data, updates = sys.argv[2], int(sys.argv[3])
d = Dictionary.load(f"{data}/dict.txt")
td = Dictionary.load(f"{data}/targets/dict.txt")
src = data_utils.load_indexed_dataset(f"{data}/train", d)
tgt = data_utils.load_indexed_dataset(f"{data}/targets/train", td)
tokens = torch.cat([src[i] for i in range(len(src))])
targets = torch.cat([tgt[i] for i in range(len(tgt))])
C = 64
n = tokens.numel() // C
inputs, targs = tokens[: C * n].view(C, n), targets[: C * n].view(C, n)
ck = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
sd = {k.replace("decoder.recurrence.", ""): v for k, v in ck["model"].items()}
model = TanhRnn(len(d), sd["weight"].shape[0])
model.load_state_dict(sd)
params = [p for _, p in trainable(model)]
opt = torch.optim.Adam(params, lr=0.01)
est = KfRtrl(seed=1)
carry = est.start(model, C)
V = len(d)
for s in range(updates):
    opt.zero_grad()
    sl = slice(10 * s, 10 * s + 10)
    loss, carry = est.accumulate(model, inputs[:, sl], targs[:, sl], carry, C * 10)
    g = torch.nn.utils.clip_grad_norm_(params, 1.0)
    radius = torch.linalg.eigvals(model.weight.detach()[:, V:]).abs().max().item()
    if s % 5 == 0 or not torch.isfinite(g):
        print(
            f"update {s}: loss {loss:.3f} gnorm {g:.3g} |A| {carry.extras['A'].norm():.3g} |u| {carry.extras['u'].norm():.3g} radius {radius:.2f}",
            flush=True,
        )
    if not torch.isfinite(g):
        break
    opt.step()
