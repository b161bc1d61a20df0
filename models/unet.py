"""Small epsilon-networks shipped with the suite: a UNet for 8x8 images and an MLP for 2-D points.

Both take (x, t) with t the schedule's continuous time, shape (batch,), and return eps shaped like x.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding of scale*t (Vaswani et al. 2017, sec. 3.5; DDPM's time embedding)."""
    half = dim // 2
    dt = t.dtype if t.is_floating_point() else torch.float32     # float64 references stay float64
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=dt, device=t.device) / half)
    args = scale * t.to(dt)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class TimeMLP(nn.Module):
    def __init__(self, emb_dim: int, out_dim: int):
        super().__init__()
        self.emb_dim = emb_dim
        self.net = nn.Sequential(nn.Linear(emb_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t):
        return self.net(timestep_embedding(t, self.emb_dim).to(self.net[0].weight.dtype))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added in between (DDPM's residual block)."""

    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int = 8):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.temb = nn.Linear(t_dim, c_out)
        self.norm2, self.conv2 = nn.GroupNorm(groups, c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        h = h + self.temb(nn.functional.silu(temb))[:, :, None, None]
        h = self.conv2(nn.functional.silu(self.norm2(h)))
        return self.skip(x) + h


def build_encoder(module: nn.Module, in_ch: int, chs: list, t_dim: int) -> int:
    """The UNet's encoder on `module` (conv_in, then per level a ResBlock and a stride-2 downsample, none after the
    last): shared by UNet and NoisyDigitClassifier, same parameter names.  Returns the last level's channels."""
    module.conv_in = nn.Conv2d(in_ch, chs[0], 3, padding=1)
    module.down = nn.ModuleList()
    module.downsample = nn.ModuleList()
    c = chs[0]
    for i, co in enumerate(chs):
        module.down.append(ResBlock(c, co, t_dim))
        c = co
        module.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1) if i < len(chs) - 1 else nn.Identity())
    return c


class UNet(nn.Module):
    """UNet eps-net: one ResBlock per level going down, two going up with skip connections.

    n_classes > 0 makes it class-conditional: forward(x, t, cond) adds a learned class embedding (n_classes + 1
    rows, the last the null label meaning "unconditional", as classifier-free guidance trains it; Ho & Salimans
    2022) to the time embedding; cond=None asks for the null label."""

    def __init__(self, in_ch: int = 1, base: int = 32, mults=(1, 2, 2), t_dim: int = 128, n_classes: int = 0):
        super().__init__()
        self.config = {"in_ch": in_ch, "base": base, "mults": list(mults), "t_dim": t_dim}
        if n_classes:
            self.config["n_classes"] = int(n_classes)
        self.n_classes = int(n_classes)
        self.null_label = self.n_classes
        chs = [base * m for m in mults]
        self.time = TimeMLP(t_dim // 2, t_dim)
        self.label_emb = nn.Embedding(self.n_classes + 1, t_dim) if self.n_classes else None
        c = build_encoder(self, in_ch, chs, t_dim)
        self.mid = ResBlock(c, c, t_dim)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, co in reversed(list(enumerate(chs))):
            self.up.append(ResBlock(c + co, co, t_dim))
            c = co
            self.upsample.append(nn.Upsample(scale_factor=2, mode="nearest") if i > 0 else nn.Identity())
        self.out = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, in_ch, 3, padding=1))

    def forward(self, x, t, cond=None):
        temb = self.time(t)
        if self.label_emb is not None:
            if cond is None:
                cond = torch.full((x.shape[0],), self.null_label, dtype=torch.long, device=x.device)
            temb = temb + self.label_emb(cond.long()).to(temb.dtype)
        elif cond is not None:
            raise ValueError("this UNet is unconditional (n_classes=0) but was given a condition")
        h = self.conv_in(x)
        skips = []
        for block, down in zip(self.down, self.downsample):
            h = block(h, temb)
            skips.append(h)
            h = down(h)
        h = self.mid(h, temb)
        for block, up in zip(self.up, self.upsample):
            h = block(torch.cat([h, skips.pop()], 1), temb)
            h = up(h)
        return self.out(h)


class MLPEps(nn.Module):
    """MLP eps-net for low-dimensional points: [x, emb(t)] -> hidden layers -> eps."""

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, t_dim: int = 64):
        super().__init__()
        self.config = {"dim": dim, "hidden": hidden, "depth": depth, "t_dim": t_dim}
        self.time = TimeMLP(t_dim, t_dim)
        layers, c = [], dim + t_dim
        for _ in range(depth):
            layers += [nn.Linear(c, hidden), nn.SiLU()]
            c = hidden
        self.net = nn.Sequential(*layers, nn.Linear(c, dim))

    def forward(self, x, t):
        return self.net(torch.cat([x, self.time(t)], 1))


class DigitClassifier(nn.Module):
    """Small CNN for 8x8 digits; features() is the penultimate layer used for FID on this domain."""

    def __init__(self, width: int = 32, feat_dim: int = 64, n_classes: int = 10):
        super().__init__()
        self.config = {"width": width, "feat_dim": feat_dim, "n_classes": n_classes}
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 2x2
            nn.Flatten(), nn.Linear(8 * w, feat_dim), nn.ReLU())
        self.head = nn.Linear(feat_dim, n_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


class NoisyDigitClassifier(nn.Module):
    """Noise-aware classifier p_t(y | x_t) for classifier guidance: the UNet's encoder half (ResBlocks with the time
    embedding added, strided-conv downsampling) and a GroupNorm-SiLU-mean-pool-linear head (Dhariwal & Nichol 2021,
    sec. 4 and app. C).  forward(x, t) -> logits (B, n_classes), x = x_t in data units, t the schedule time (B,)
    (a 0-d t is broadcast).  SiLU and mean pooling only, so grad_x log p_t(y | x) is smooth."""

    def __init__(self, in_ch: int = 1, base: int = 32, mults=(1, 2), t_dim: int = 64, n_classes: int = 10):
        super().__init__()
        self.config = {"in_ch": in_ch, "base": base, "mults": list(mults), "t_dim": t_dim, "n_classes": n_classes}
        self.n_classes = int(n_classes)
        chs = [base * m for m in mults]
        self.time = TimeMLP(t_dim // 2, t_dim)
        c = build_encoder(self, in_ch, chs, t_dim)
        self.norm_out = nn.GroupNorm(8, c)
        self.head = nn.Linear(c, self.n_classes)

    def forward(self, x, t):
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        temb = self.time(t)
        h = self.conv_in(x)
        for block, down in zip(self.down, self.downsample):
            h = down(block(h, temb))
        h = nn.functional.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.head(h)


ARCHS = {"unet": UNet, "mlp": MLPEps, "digit_classifier": DigitClassifier,
         "noisy_digit_classifier": NoisyDigitClassifier}
