"""Does KF-RTRL blow up at a pass start from a checkpoint? Full-BPTT gradient norms over the first
T steps of the training stream, and KF-RTRL gradient / sensitivity norms over 80 segments of 10 from
the zero state, parameters fixed, for 3 random seeds. Usage: python diag.py CHECKPOINT DATA_BIN"""

import sys

import torch
from fairseq.data import Dictionary, data_utils

from atbptt.estimators import KfRtrl, TanhRnn
from atbptt.estimators.base import flatten, full_gradient, trainable

torch.manual_seed(0)
data = sys.argv[2]  # the copy data-bin the run trained on
d = Dictionary.load(f"{data}/dict.txt")
td = Dictionary.load(f"{data}/targets/dict.txt")
src = data_utils.load_indexed_dataset(f"{data}/train", d)
tgt = data_utils.load_indexed_dataset(f"{data}/targets/train", td)
tokens = torch.cat([src[i] for i in range(len(src))])
targets = torch.cat([tgt[i] for i in range(len(tgt))])
C = 64
n = tokens.numel() // C
inputs = tokens[: C * n].view(C, n)
targs = targets[: C * n].view(C, n)
ck = torch.load(sys.argv[1], map_location="cpu", weights_only=False)
sd = {k.replace("decoder.recurrence.", ""): v for k, v in ck["model"].items()}
model = TanhRnn(len(d), sd["weight"].shape[0])
model.load_state_dict(sd)
W_h = model.weight.detach()[:, len(d) :]
print(
    "vocab",
    len(d),
    "H",
    W_h.shape[0],
    "spectral radius W_h",
    torch.linalg.eigvals(W_h).abs().max().item(),
    "||W_h||_2",
    torch.linalg.matrix_norm(W_h, 2).item(),
)
for T in (50, 100, 200, 400, 800):
    g = full_gradient(model, inputs[:, :T], targs[:, :T], C * 10)
    print(f"full BPTT over the first {T} steps: grad norm {g.norm():.3g}")
for seed in (1, 2, 3):
    est = KfRtrl(seed=seed)
    params = [p for _, p in trainable(model)]
    carry = est.start(model, C)
    out = []
    for s in range(80):
        for p in params:
            p.grad = None
        sl = slice(10 * s, 10 * s + 10)
        loss, carry = est.accumulate(model, inputs[:, sl], targs[:, sl], carry, C * 10)
        g = flatten([p.grad for p in params], params).norm().item()
        out.append((s, g, carry.extras["A"].norm().item(), carry.extras["u"].norm().item()))
    print("seed", seed, " ".join(f"{s}:{g:.2g}/A{a:.1g}/u{u:.1g}" for s, g, a, u in out[::8]))
