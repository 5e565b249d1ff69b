"""Register your own transformer with eekernels' family table, then run it with early exit in place.

``TinyDiT`` below stands for any model diffusers does not have: a stack of blocks between an embedding and a
head. Registering it is one ``Family``: which class, which block list, which argument and output of a block is
the image stream. ``eekernels.accelerate`` then keeps your object and runs ``schedule.depth(t)`` of its blocks
at each call (the head runs on the exit state), with no change to your code or your checkpoints.

    python python/examples/07_register_family.py
"""
import copy

import torch
import torch.nn as nn

import eekernels
from eekernels import ExitSchedule
from eekernels.families import Family, PrefixExit, register


# --------------------------------------------------------------------------------------------------
# Your model (not in diffusers): timestep-conditioned residual MLP blocks over tokens
# --------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm, self.mlp, self.ada = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(),
                                                                          nn.Linear(2 * dim, dim)), nn.Linear(dim, dim)

    def forward(self, x, c):
        return x + self.mlp(self.norm(x) * (1 + self.ada(c)[:, None]))


class TinyDiT(nn.Module):
    def __init__(self, dim=32, depth=6, channels=4):
        super().__init__()
        self.embed, self.t_embed = nn.Linear(channels, dim), nn.Sequential(nn.Linear(1, dim), nn.SiLU())
        self.layers = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, channels)

    def forward(self, x, timestep):
        """x: (B, N, channels) tokens; timestep: (B,) in [0, 1000)."""
        c = self.t_embed(timestep[:, None].float() / 1000)
        h = self.embed(x)
        for block in self.layers:
            h = block(h, c)
        return self.head(h)


# --------------------------------------------------------------------------------------------------
# The registration: about ten lines
# --------------------------------------------------------------------------------------------------
register(Family(
    name="tiny-dit",
    classes=(TinyDiT,),
    # depth d runs layers[:d], then the head; a block's argument `x` (position 0 of its output) is the image stream
    exit=PrefixExit(blocks=("layers",), streams={"layers": (0, None, "x", None)}),
    param_roles={"t-embedder": ("t_embed.",)},
))


def main():
    torch.manual_seed(0)
    model = TinyDiT().eval()
    plain = copy.deepcopy(model)
    x = torch.randn(2, 16, 4)
    schedule = ExitSchedule.linear(min_depth=2, max_depth=6)  # 2 blocks at the noise end, 6 at the data end

    assert eekernels.accelerate(model, schedule=schedule) is model  # in place: the same object
    with torch.no_grad():
        for t in (950.0, 500.0, 50.0):
            d = int(schedule.depth(torch.tensor([t]))[0])
            out = model(x, torch.full((2,), t))  # a CPU timestep: the depth is chosen on the host
            sliced = copy.deepcopy(plain)
            sliced.layers = sliced.layers[:d]
            assert torch.equal(out, sliced(x, torch.full((2,), t)))
            print(f"t = {t:5.0f}: ran {d} of 6 blocks, equal to the model cut by hand after block {d}")
    eekernels.disable(model)  # the plain model again
    with torch.no_grad():
        assert torch.equal(model(x, torch.full((2,), 950.0)), plain(x, torch.full((2,), 950.0)))
    print("disabled: full depth again")


if __name__ == "__main__":
    main()
