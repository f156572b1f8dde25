#!/usr/bin/env python3
"""Training throughput of forger's DCGAN step under PyTorch DistributedDataParallel (gloo, CPU).

scripts/bench.sh runs this next to forger, so the model, losses and step follow forger's
(docs/MODEL.md, worker/src/model.rs and replica.rs) layer by layer: TF 'same' padding done
explicitly, legacy bilinear resize as two fixed matrices, shift-only batch norm (eps 1e-3),
one evaluation with all-reduced losses, the 1.35 balancing rule, a D update, then a G update
through the updated and frozen D.

The images are synthetic: uniform random tensors in [0, 1) of shape [n, 3, 40, 40], made once
with a fixed seed before timing. Image content does not change the work of a step, so the
throughput is that of real data (without the decoding, which forger also does before timing).

Prints one JSON line on stdout (rank 0); everything else goes to stderr.
"""
import argparse
import json
import statistics
import os
import socket
import sys
import time
import warnings

# The venv has no numpy and torch warns about it on import (in every spawned process too).
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

SIDE, NOISE, KERNEL, LEAK, EPS_LOG = 40, 16, 5, 0.2, 1e-12
ARTICLE = ((256, 128, 64), 4_320_705, 1_049_763)  # filters, D params, G params (MODEL.md)


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def same_padding(size, stride):
    """TF 'SAME' padding (before, after) of one axis; the odd pixel goes after."""
    out = (size + stride - 1) // stride
    total = max((out - 1) * stride + KERNEL - size, 0)
    return total // 2, total - total // 2


def lrelu(x):
    return torch.maximum(x, LEAK * x)


class ConvSame(nn.Conv2d):
    """tf.nn.conv2d(padding='SAME'): torch pads symmetrically, TF puts the extra pixel after."""

    def __init__(self, cin, cout, stride):
        super().__init__(cin, cout, KERNEL, stride=stride, padding=0)

    def forward(self, x):
        top, bottom = same_padding(x.shape[2], self.stride[0])
        left, right = same_padding(x.shape[3], self.stride[1])
        return super().forward(F.pad(x, (left, right, top, bottom)))


class DeconvSame(nn.ConvTranspose2d):
    """tf.nn.conv2d_transpose(padding='SAME') to stride * input: the adjoint of ConvSame, i.e.
    the transposed conv with padding `before`, cropped at the end (one surplus row for stride 2)."""

    def __init__(self, cin, cout, stride):
        # SAME's `before` on an even output side: 1 for stride 2, 2 for stride 1.
        super().__init__(cin, cout, KERNEL, stride=stride, padding=(KERNEL - stride) // 2)

    def forward(self, x):
        h, w = x.shape[2] * self.stride[0], x.shape[3] * self.stride[1]
        return super().forward(x)[:, :, :h, :w]


class ShiftBatchNorm(nn.Module):
    """tf.contrib.layers.batch_norm defaults: shift, no scale, eps 1e-3, decay 0.9. Torch's
    running variance is the unbiased one, as TF's fused batch norm tracks."""

    def __init__(self, channels):
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(channels))
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))

    def forward(self, x):
        return F.batch_norm(x, self.mean, self.var, None, self.beta, self.training, 0.1, 1e-3)


class Discriminator(nn.Module):
    def __init__(self, f, dropout):
        super().__init__()
        self.convs = nn.ModuleList([ConvSame(3, f[0], 2), ConvSame(f[0], f[1], 1), ConvSame(f[1], f[2], 1)])
        self.fc1 = nn.Linear(f[2] * (SIDE // 2) ** 2, 128)
        self.fc2 = nn.Linear(128, 1)
        self.dropout = dropout

    def forward(self, x):
        for conv in self.convs:
            x = F.dropout(lrelu(conv(x)), self.dropout, self.training)
        return torch.sigmoid(self.fc2(lrelu(self.fc1(x.flatten(1)))))


def legacy_bilinear(inp, out):
    """TF1's legacy resize of one axis as an [out, inp] matrix: pixel d samples d * inp / out."""
    m = torch.zeros(out, inp)
    for d in range(out):
        src = d * inp / out
        lo = int(src)
        m[d, lo] += 1 - (src - lo)
        m[d, min(lo + 1, inp - 1)] += src - lo
    return m


class Generator(nn.Module):
    def __init__(self, f, dropout):
        super().__init__()
        self.fc = nn.Linear(NOISE, 48)
        self.bns = nn.ModuleList([ShiftBatchNorm(c) for c in (48, f[0], f[1], f[2])])
        self.deconvs = nn.ModuleList([DeconvSame(3, f[0], 2), DeconvSame(f[0], f[1], 2),
                                      DeconvSame(f[1], f[2], 1), DeconvSame(f[2], 3, 1)])
        self.register_buffer("resize", legacy_bilinear(4, SIDE // 4))  # 4x4 seed -> 10x10
        self.dropout = dropout

    def drop(self, x):
        return F.dropout(x, self.dropout, self.training)

    def forward(self, z):
        x = self.bns[0](self.drop(lrelu(self.fc(z))))
        x = self.resize @ x.view(-1, 3, 4, 4) @ self.resize.T
        for deconv, bn in zip(self.deconvs[:3], self.bns[1:]):
            x = bn(self.drop(lrelu(deconv(x))))
        return torch.sigmoid(self.deconvs[3](x))


def loss_d_of(real_p, fake_p):
    return (0.5 * (-torch.log(real_p + EPS_LOG) - torch.log(1 - fake_p + EPS_LOG))).mean()


def loss_g_of(fake_p):
    return (-torch.log(fake_p + EPS_LOG)).mean()


def count(module):
    return sum(p.numel() for p in module.parameters())


def worker(rank, args, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=args.workers)
    torch.manual_seed(0)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    d_net, g_net = Discriminator(args.filters, args.dropout), Generator(args.filters, args.dropout)
    params_d, params_g = count(d_net), count(g_net)
    if tuple(args.filters) == ARTICLE[0]:
        assert (params_d, params_g) == ARTICLE[1:], f"article model has {params_d}, {params_g} params"
    # forger shares batch-norm statistics only for sampling: no buffer broadcast per forward.
    d, g = DDP(d_net, forward_sync_buffers=False), DDP(g_net, forward_sync_buffers=False)
    # TF1 RMSProp (alpha 0.9, eps 1e-10); L2 1e-6 added to the gradient, as forger does.
    opt_d = torch.optim.RMSprop(d.parameters(), lr=1e-4, alpha=0.9, eps=1e-10, weight_decay=1e-6)
    opt_g = torch.optim.RMSprop(g.parameters(), lr=2e-4, alpha=0.9, eps=1e-10, weight_decay=1e-6)

    # Every rank makes the same synthetic set and trains on its own contiguous share of it.
    data = torch.rand(args.images, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1234))
    share = data[rank * args.images // args.workers:(rank + 1) * args.images // args.workers]
    noise_rng = torch.Generator().manual_seed(1000 + rank)
    batches = share.shape[0] // args.batch
    d.train(), g.train()

    times, skipped = [], {"d": 0, "g": 0}
    dist.barrier()
    for step in range(args.steps):
        start = time.perf_counter()
        i = step % batches
        real = share[i * args.batch:(i + 1) * args.batch]
        z = torch.rand(args.batch, NOISE, generator=noise_rng)

        # (1) Evaluate on the current weights: no gradients and no dropout, as forger's
        # evaluate; batch norm uses the batch statistics (train mode).
        with torch.no_grad():
            d_net.dropout = g_net.dropout = 0.0
            fake = g(z)
            real_p, fake_p = d(real), d(fake)
            losses = torch.stack([loss_d_of(real_p, fake_p), loss_g_of(fake_p)])
            d_net.dropout = g_net.dropout = args.dropout
        dist.all_reduce(losses)
        loss_d, loss_g = (losses / args.workers).tolist()

        # (2) Balance; every rank sees the same mean losses, so all take the same branch and
        # DDP's collectives stay matched.
        train_g, train_d = not loss_g * 1.35 < loss_d, not loss_d * 1.35 < loss_g
        skipped["g"] += not train_g
        skipped["d"] += not train_d

        # (3) D update; DDP all-reduces D's gradients during backward.
        if train_d:
            with torch.no_grad():
                fake = g(z)
            opt_d.zero_grad(set_to_none=True)
            loss_d_of(d(real), d(fake)).backward()
            opt_d.step()

        # (4) G update through the updated D. D is frozen (no gradients, no weight-gradient
        # convolutions, as forger's Frozen guard) and called without its DDP wrapper, so its
        # reducer neither expects nor all-reduces anything in this backward.
        if train_g:
            d_net.requires_grad_(False)
            opt_g.zero_grad(set_to_none=True)
            loss_g_of(d_net(g(z))).backward()
            opt_g.step()
            d_net.requires_grad_(True)

        times.append(time.perf_counter() - start)
        if rank == 0:
            log(f"step {step + 1}/{args.steps}: {times[-1]:.4f} s, loss_d {loss_d:.4f}, "
                f"loss_g {loss_g:.4f}, train D {train_d}, G {train_g}")

    if rank == 0:
        timed = times[1:]  # the first step pays for allocations and thread start-up
        mean = sum(timed) / len(timed)
        median = statistics.median(timed)
        log(f"skipped D in {skipped['d']} and G in {skipped['g']} of {args.steps} steps")
        print(json.dumps({
            "workers": args.workers, "threads_per_worker": args.threads, "steps_timed": len(timed),
            "mean_step_seconds": round(mean, 6),
            "median_step_seconds": round(median, 6),
            "images_per_second": round(args.workers * args.batch / mean, 3),
            "params_d": params_d, "params_g": params_g, "torch": torch.__version__,
        }), flush=True)
    dist.destroy_process_group()


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=1, help="processes (DDP ranks)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--steps", type=int, default=10, help="steps, the first of them not timed")
    p.add_argument("--filters", default="64,32,16", help="three filter counts, D and G alike")
    p.add_argument("--batch", type=int, default=16, help="batch size per rank")
    p.add_argument("--dropout", type=float, default=0.0, help="fraction dropped in training")
    p.add_argument("--images", type=int, default=2000, help="synthetic dataset size")
    args = p.parse_args()
    try:
        args.filters = [int(f) for f in args.filters.split(",")]
    except ValueError:
        p.error(f"--filters {args.filters!r} is not comma-separated integers")
    if len(args.filters) != 3 or min(args.filters) < 1:
        p.error(f"--filters needs three positive counts, got {args.filters}")
    for name in ("workers", "threads", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step is not timed)")
    if not 0.0 <= args.dropout < 1.0:
        p.error(f"--dropout {args.dropout} is not in [0, 1)")
    if args.images < args.workers * args.batch:
        p.error(f"--images {args.images} cannot give each of {args.workers} workers a batch of {args.batch}")
    return args


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    args = parse_args()
    # Inherited by the spawned processes before their OpenMP starts: no oversubscription.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    mp.spawn(worker, args=(args, free_port()), nprocs=args.workers, join=True)
