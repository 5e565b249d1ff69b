"""Fine-tune your own DiT for early exit (ASE) on your own data, then sample with it.

A truncated network only estimates the score well after it has been trained under its exit schedule: each
training sample's t picks its depth, and the diffusion loss is applied to that truncated output. The steps:

1. load your checkpoint (facebookresearch/DiT layout; diffusers and U-ViT loaders exist too);
2. wrap your data: any ``torch.utils.data.Dataset`` of ``(image (C, H, W) in [-1, 1] or uint8, label)``;
3. ``Trainer(model, TrainConfig(...), data, schedule)``: each sample runs only its own blocks (sorted by depth);
4. save the result in your layout (``checkpoint_state_dict()``) and sample with the same schedule.

Here "your" checkpoint is a small random DiT and "your" data a procedural set of striped squares (class =
stripe direction), so that it runs anywhere in seconds. For a real model: ``--checkpoint DiT-XL-2-256x256.pt``
with your latent dataset, a GPU, and thousands of steps (the ASE reference: AdamW at 1e-5, EMA 0.9999).

    python python/examples/04_finetune_own_model.py --steps 30 --out /tmp/ex04
"""
import argparse
import os

import torch

import eekernels
from eekernels.models import DiT
from eekernels.training import DiffusionTables, TrainConfig, Trainer, diffusion_loss


# --------------------------------------------------------------------------------------------------
# Your data: any map-style Dataset of (image, label)
# --------------------------------------------------------------------------------------------------
class Stripes(torch.utils.data.Dataset):
    """16x16 RGB squares with stripes in one of 4 directions (the label), random colour and phase."""

    def __init__(self, n=512, size=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, 4, (n,), generator=g)
        self.colors = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
        self.phase = torch.rand(n, generator=g) * 6.28
        ii, jj = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        self.coords = [ii, jj, ii + jj, ii - jj]  # horizontal, vertical, two diagonals

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        wave = torch.sin(self.coords[int(self.labels[i])] * 1.2 + self.phase[i])
        return (self.colors[i] * wave[None]).clamp(-1, 1), int(self.labels[i])


@torch.no_grad()
def truncated_loss(model, schedule, data, n=64, seed=1):
    """The diffusion loss of the model exiting at schedule.depth(t), on fixed held-out samples."""
    g = torch.Generator().manual_seed(seed)
    items = [data[i] for i in torch.randint(0, len(data), (n,), generator=g).tolist()]
    x, y = torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])
    t = torch.randint(0, 1000, (n,), generator=g)
    noise = torch.randn(x.shape, generator=g)
    return float(diffusion_loss(model, x, t, noise, DiffusionTables(), y=y, depth=schedule.depth(t))["loss"])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="your facebookresearch-layout DiT checkpoint (default: a small random one)")
    p.add_argument("--num-heads", type=int, help="heads, if the checkpoint's size is not a named DiT config")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="1e-3 for this toy from scratch; ASE used 1e-5")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="ex04")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)

    # ---- 1. your checkpoint (facebookresearch layout: x_embedder, t_embedder, blocks.i.adaLN_modulation, ...)
    if args.checkpoint is None:
        args.checkpoint = os.path.join(args.out, "your_dit.pt")
        mine = DiT(input_size=16, patch_size=2, in_channels=3, hidden_size=64, depth=6, num_heads=4, num_classes=4)
        torch.save(mine.checkpoint_state_dict(), args.checkpoint)
        args.num_heads = 4  # not a named config: its shapes cannot tell the heads
    model = DiT.from_checkpoint(args.checkpoint, num_heads=args.num_heads).to(args.device)
    schedule = eekernels.ExitSchedule.preset("ase-demo", total_depth=model.num_blocks)
    data = Stripes()
    print(f"model: {model.num_blocks} blocks, width {model.hidden_size}; schedule {schedule}")

    # ---- 2-3. fine-tune under the schedule (every sample runs only the blocks its t asks for)
    before = truncated_loss(model.cpu(), schedule, data)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, ema_decay=0.99, ema_warmup=True,
                         log_every=max(1, args.steps // 3), trainable="all")
    trainer = Trainer(model.to(args.device), config, data=data, schedule=schedule, device=args.device)
    summary = trainer.train(out_dir=args.out)  # writes checkpoint.pt (model, EMA, optimizer, step): resumable
    after = truncated_loss(model.cpu(), schedule, data)
    print(f"truncated-network loss on held-out samples: {before:.4f} before, {after:.4f} after "
          f"{summary['steps']} steps ({summary['steps_per_s']} steps/s)")
    assert after < before, "fine-tuning under the schedule must lower the truncated network's loss"

    # ---- 4. save in your layout, and sample with the schedule it was tuned for
    torch.save(model.checkpoint_state_dict(), os.path.join(args.out, "your_dit_ase.pt"))
    tuned = DiT.from_checkpoint(os.path.join(args.out, "your_dit_ase.pt"), num_heads=args.num_heads).eval()
    noise = torch.randn(8, 3, 16, 16)
    samples = eekernels.sample(tuned, noise, torch.arange(8) % 4, sampler="dpmsolver++", steps=10, cfg_scale=2.0,
                               schedule=schedule)
    from eekernels.eval.images import save_grid, to_uint8

    save_grid(os.path.join(args.out, "samples.png"), to_uint8(samples), nrow=4)
    print(f"wrote {args.out}/your_dit_ase.pt and {args.out}/samples.png")


if __name__ == "__main__":
    main()
