"""facebookresearch/DiT's sample.py, accelerated by eekernels with one added line.

DiT's sample.py does, in essence:

    model = DiT_models[args.model](input_size=latent_size, num_classes=args.num_classes).to(device)
    model.load_state_dict(find_model(ckpt_path)); model.eval()
    diffusion = create_diffusion(str(args.num_sampling_steps))
    z = torch.randn(n, 4, latent_size, latent_size); z = torch.cat([z, z], 0)
    y = torch.cat([y, torch.tensor([1000] * n)], 0)
    samples = diffusion.p_sample_loop(model.forward_with_cfg, z.shape, z, model_kwargs=dict(y=y, cfg_scale=4.0))

This script keeps that shape; the eekernels line is marked ``>>> eekernels``. So that it runs anywhere with
nothing downloaded, "your code" below is a compact copy of DiT's models.py and a DDIM loop in place of
create_diffusion. The weights are the glyph DiT shipped with eekernels, written out in the facebookresearch
layout (or, if it is not installed, a tiny random DiT).

    python python/examples/01_dit_sample_loop.py --out /tmp/ex01
    python python/examples/01_dit_sample_loop.py --checkpoint DiT-XL-2-256x256.pt --num-heads 16 \\
        --vae stabilityai/sd-vae-ft-ema --steps 50 --device cuda      # a real DiT (downloads the VAE)
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import eekernels


# --------------------------------------------------------------------------------------------------
# Your code: facebookresearch/DiT models.py (compact, same names, same math)
# --------------------------------------------------------------------------------------------------
def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Attention(nn.Module):  # timm's
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.qkv, self.proj = num_heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    def __init__(self, D, num_heads, mlp_ratio):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6), Attention(D, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6), Mlp(D, int(D * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DiT(nn.Module):
    def __init__(self, input_size, patch_size, in_channels, hidden_size, depth, num_heads, mlp_ratio=4.0,
                 num_classes=1000, learn_sigma=True):
        super().__init__()
        D, self.p, self.in_channels = hidden_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, D, patch_size, stride=patch_size)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, D)  # + the CFG null class
        self.pos_embed = nn.Parameter(torch.zeros(1, (input_size // patch_size) ** 2, D), requires_grad=False)
        self.blocks = nn.ModuleList(DiTBlock(D, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(D, patch_size * patch_size * self.out_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x, t, y):
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        half = 128
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        c = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        c = c + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
        x = self.final_layer.linear(modulate(self.final_layer.norm_final(x), shift, scale))
        h = w = int(x.shape[1] ** 0.5)
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, self.p, self.p, self.out_channels))
        return x.reshape(x.shape[0], self.out_channels, h * self.p, w * self.p)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        half = x[: len(x) // 2]
        model_out = self.forward(torch.cat([half, half], dim=0), t, y)
        eps, rest = model_out[:, :3], model_out[:, 3:]  # DiT applies guidance to 3 channels
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


# --------------------------------------------------------------------------------------------------
# Your code: the sampling loop (DDIM over DiT's linear betas; DiT's p_sample_loop calls the model the same way)
# --------------------------------------------------------------------------------------------------
def ddim_timesteps(steps, num_timesteps=1000):
    return list(range(0, num_timesteps, num_timesteps // steps))[::-1]


@torch.no_grad()
def ddim_sample_loop(model_fn, z, model_kwargs, steps, num_timesteps=1000):
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, num_timesteps, dtype=torch.float64), 0)
    ts = ddim_timesteps(steps, num_timesteps)
    x = z
    for i, t in enumerate(ts):
        a, a_prev = float(ac[t]), float(ac[ts[i + 1]]) if i + 1 < len(ts) else 1.0
        eps = model_fn(x, torch.full((x.shape[0],), t, device=x.device), **model_kwargs)[:, : x.shape[1]]
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return x


# --------------------------------------------------------------------------------------------------
# Weights: a real checkpoint, the shipped glyph DiT, or a tiny random one
# --------------------------------------------------------------------------------------------------
def load_weights(args):
    """(state dict in the facebookresearch layout, constructor kwargs of the DiT above)."""
    from eekernels.models import DiT as EEDiT, pretrained_names

    if args.checkpoint:
        ee = EEDiT.from_checkpoint(args.checkpoint, num_heads=args.num_heads)
    elif "glyph-dit" in pretrained_names():
        from eekernels.models import load_pretrained

        ee = load_pretrained("glyph-dit")
    else:  # random weights: the images are noise, but every comparison below still holds
        ee = EEDiT(input_size=16, patch_size=2, in_channels=3, hidden_size=64, depth=4, num_heads=4, num_classes=10)
        with torch.no_grad():
            for p in ee.parameters():
                p.normal_(0, 0.05)
    kwargs = dict(input_size=ee.input_size, patch_size=ee.patch_size, in_channels=ee.in_channels,
                  hidden_size=ee.hidden_size, depth=ee.num_blocks, num_heads=ee.num_heads,
                  mlp_ratio=ee.blocks[0].mlp.fc1.out_features / ee.hidden_size, num_classes=ee.num_classes,
                  learn_sigma=ee.learn_sigma)
    return {k: v.float() for k, v in ee.checkpoint_state_dict().items()}, kwargs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a facebookresearch DiT checkpoint (default: the shipped glyph DiT)")
    p.add_argument("--num-heads", type=int, default=None, help="heads, if the checkpoint's size is not a known config")
    p.add_argument("--vae", help="diffusers AutoencoderKL (hub id or folder) for latent models")
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="ex01_samples.png")
    args = p.parse_args()
    torch.manual_seed(0)

    state, kwargs = load_weights(args)
    model = DiT(**kwargs).to(args.device)
    model.load_state_dict(state)
    model.eval()
    n, S, C = args.num_images, kwargs["input_size"], kwargs["in_channels"]
    z = torch.randn(n, C, S, S, device=args.device)
    y = torch.arange(n, device=args.device) % kwargs["num_classes"]
    z, y = torch.cat([z, z], 0), torch.cat([y, torch.full_like(y, kwargs["num_classes"])], 0)
    run = dict(z=z, model_kwargs=dict(y=y, cfg_scale=args.cfg_scale), steps=args.steps)

    # >>> eekernels: the same module API (forward, forward_with_cfg), eekernels models and kernels inside.
    fast = eekernels.accelerate(model, native=True)  # full depth: the same function
    schedule = eekernels.ExitSchedule.preset("ase-demo", total_depth=kwargs["depth"])
    fast_ase = eekernels.accelerate(model, schedule=schedule, native=True)  # early exit: depth = schedule.depth(t)

    results = {}
    for name, m in (("your DiT", model), ("eekernels, full depth", fast), ("eekernels, ASE schedule", fast_ase)):
        ddim_sample_loop(m.forward_with_cfg, z, run["model_kwargs"], 1)  # warm-up (first-call costs)
        t0 = time.perf_counter()
        results[name] = ddim_sample_loop(m.forward_with_cfg, **run)[:n]
        dt = time.perf_counter() - t0
        print(f"{name:24s} {n / dt:8.2f} images/s")
    err = (results["eekernels, full depth"] - results["your DiT"]).abs().max().item()
    print(f"max |eekernels full depth - your DiT| = {err:.2e}")
    assert err < 1e-3, "full depth must be the original function"
    frac = schedule.block_flop_fraction(torch.tensor(ddim_timesteps(args.steps)))
    print(f"ASE schedule: {frac:.2f} of the full-depth block FLOPs")

    x = results["eekernels, ASE schedule"]
    if args.vae:
        from diffusers.models import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.vae).to(args.device)
        x = vae.decode(x / 0.18215).sample
    from eekernels.eval.images import save_grid, to_uint8

    save_grid(args.out, to_uint8(x[:, :3]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
