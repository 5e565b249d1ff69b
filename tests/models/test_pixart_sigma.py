"""PixArt-Σ's self-attention options (PixArt-sigma's ``qk_norm`` and ``kv_compress_config``) against an
independent implementation of PixArt-sigma's ``PixArtMS`` / ``AttentionKVCompress``, written here from its
definition (every parameter randomized, float32, odd sizes), at full depth and at every exit depth, through the
loaders users call; and the refusals, each naming the option."""
import inspect

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eekernels
from eekernels.models import TextCondition
from eekernels.models import _layers as L
from eekernels.models.convert import pixart as convert_pixart
from eekernels.models.pixart import KV_SAMPLINGS, PIXART_CONFIGS, PixArt
from eekernels.serialization import save_state
from tests.models._reference_models import assert_bf16_autocast_close, randomize_, rel_err
from tests.utils import CUDA, INTERPRET

D, HEADS, C_IN, CAPTION, TOKENS, DEPTH, PATCH, BASE, PE = 36, 3, 4, 20, 9, 4, 2, 5, 2.0


# --------------------------------------------------------------------------------------------------
# The reference: PixArt-sigma's PixArtMS (micro_condition off) with AttentionKVCompress, as upstream defines it
# (diffusion/model/nets/PixArt_blocks.py, PixArtMS.py), parameters under PixArt-sigma's names.
# --------------------------------------------------------------------------------------------------
def _ns(**children) -> nn.Module:
    m = nn.Module()
    for k, v in children.items():
        setattr(m, k, v)
    return m


def _sincos_1d(dim, pos):  # numpy, float64 frequencies: [sin, cos]
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def _pos_embed(dim, gh, gw, base, pe):
    """PixArt-sigma's get_2d_sincos_pos_embed for a gh x gw grid: the first half embeds the column."""
    grid_h = np.arange(gh, dtype=np.float32) / (gh / base) / pe
    grid_w = np.arange(gw, dtype=np.float32) / (gw / base) / pe
    ww, hh = np.meshgrid(grid_w, grid_h)
    return torch.from_numpy(np.concatenate([_sincos_1d(dim // 2, ww), _sincos_1d(dim // 2, hh)], axis=1)).float()


def _attend(q, k, v, keep=None):
    """Softmax attention written out: q (B, N, H, d), k, v (B, M, H, d); keep (B, M) bool or None."""
    s = torch.einsum("bnhd,bmhd->bhnm", q, k) * q.shape[-1] ** -0.5
    if keep is not None:
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    return torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v)


class RefKVCompressAttention(nn.Module):
    def __init__(self, sampling, sr_ratio, qk_norm):
        super().__init__()
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.sampling, self.sr_ratio = sampling, sr_ratio
        if sr_ratio > 1 and sampling == "conv":
            self.sr = nn.Conv2d(D, D, groups=D, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(D)
        self.q_norm = nn.LayerNorm(D) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(D) if qk_norm else nn.Identity()

    def downsample_2d(self, t, H, W, s):
        B, N, C = t.shape
        if self.sampling == "uniform_every":
            return t[:, ::s], N // s
        t = t.reshape(B, H, W, C).permute(0, 3, 1, 2)
        new_n = int(H / s) * int(W / s)
        if self.sampling == "ave":
            t = F.interpolate(t, scale_factor=1 / s, mode="nearest").permute(0, 2, 3, 1)
        elif self.sampling == "uniform":
            t = t[:, :, ::s, ::s].permute(0, 2, 3, 1)
        else:  # conv
            t = self.norm(self.sr(t).reshape(B, C, -1).permute(0, 2, 1))
        return t.reshape(B, new_n, C), new_n

    def forward(self, x, hw):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, C).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        n = N
        if self.sr_ratio > 1:
            k, n = self.downsample_2d(k, *hw, self.sr_ratio)
            v, n = self.downsample_2d(v, *hw, self.sr_ratio)
        o = _attend(q.reshape(B, N, HEADS, -1), k.reshape(B, n, HEADS, -1), v.reshape(B, n, HEADS, -1))
        return self.proj(o.reshape(B, N, C))


class RefBlock(nn.Module):
    def __init__(self, sampling, sr_ratio, qk_norm):
        super().__init__()
        self.attn = RefKVCompressAttention(sampling, sr_ratio, qk_norm)
        self.cross_attn = _ns(q_linear=nn.Linear(D, D), kv_linear=nn.Linear(D, 2 * D), proj=nn.Linear(D, D))
        self.mlp = _ns(fc1=nn.Linear(D, 4 * D), fc2=nn.Linear(4 * D, D))
        self.scale_shift_table = nn.Parameter(torch.zeros(6, D))

    def forward(self, x, y, t0, keep, hw):
        B, N, _ = x.shape
        sm, cm, gm, sf, cf, gf = (self.scale_shift_table[None] + t0.reshape(B, 6, -1)).chunk(6, dim=1)
        norm = lambda z: F.layer_norm(z, (D,), eps=1e-6)  # noqa: E731
        x = x + gm * self.attn(norm(x) * (1 + cm) + sm, hw)
        ca = self.cross_attn
        kv = ca.kv_linear(y).reshape(B, -1, 2, HEADS, D // HEADS)
        o = _attend(ca.q_linear(x).reshape(B, N, HEADS, -1), kv[:, :, 0], kv[:, :, 1], keep)
        x = x + ca.proj(o.reshape(B, N, D))
        h = norm(x) * (1 + cf) + sf
        return x + gf * self.mlp.fc2(F.gelu(self.mlp.fc1(h), approximate="tanh"))


class RefPixArtMS(nn.Module):
    def __init__(self, qk_norm=False, kv_compress_config=None):
        super().__init__()
        kv = kv_compress_config or {"sampling": None, "scale_factor": 1, "kv_compress_layer": []}
        self.x_embedder = _ns(proj=nn.Conv2d(C_IN, D, PATCH, PATCH))
        self.t_embedder = _ns(mlp=nn.Sequential(nn.Linear(256, D), nn.SiLU(), nn.Linear(D, D)))
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.y_embedder = _ns(y_proj=_ns(fc1=nn.Linear(CAPTION, D), fc2=nn.Linear(D, D)))
        g = torch.Generator().manual_seed(7)
        self.y_embedder.register_buffer("y_embedding", torch.randn(TOKENS, CAPTION, generator=g) / CAPTION ** 0.5)
        self.register_buffer("pos_embed", _pos_embed(D, BASE, BASE, BASE, PE)[None])
        self.blocks = nn.ModuleList(
            RefBlock(kv["sampling"], int(kv["scale_factor"]) if i in kv["kv_compress_layer"] else 1, qk_norm)
            for i in range(DEPTH))
        self.final_layer = _ns(linear=nn.Linear(D, PATCH * PATCH * 2 * C_IN),
                               scale_shift_table=nn.Parameter(torch.zeros(2, D)))

    def forward(self, x, t, y: TextCondition, depth=DEPTH):
        B, _, H, W = x.shape
        gh, gw = H // PATCH, W // PATCH
        x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + _pos_embed(D, gh, gw, BASE, PE)
        half = 128
        freqs = torch.exp(-np.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        temb = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))
        t0 = self.t_block(temb)
        yp = self.y_embedder.y_proj
        c = yp.fc2(F.gelu(yp.fc1(y.tokens), approximate="tanh"))
        for block in self.blocks[:depth]:
            x = block(x, c, t0, y.mask, (gh, gw))
        shift, scale = (self.final_layer.scale_shift_table[None] + temb[:, None]).chunk(2, dim=1)
        x = self.final_layer.linear(F.layer_norm(x, (D,), eps=1e-6) * (1 + scale) + shift)
        x = x.reshape(B, gh, gw, PATCH, PATCH, -1)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(B, -1, gh * PATCH, gw * PATCH)


def _reference(qk_norm=False, kv=None, seed=0):
    ref = randomize_(RefPixArtMS(qk_norm, kv), seed=seed).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # wide q/k LayerNorm gains: peaked attention, where a wrong QK-norm shows
        for name, m in ref.named_modules():
            if isinstance(m, nn.LayerNorm) and name.endswith(("q_norm", "k_norm")):
                m.weight.copy_(torch.randn(D, generator=g) * 1.5)
    return ref


def _inputs(H, W, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C_IN, H, W, generator=g)
    t = torch.rand(B, generator=g) * 1000
    tokens = torch.randn(B, TOKENS, CAPTION, generator=g)
    mask = torch.ones(B, TOKENS, dtype=torch.bool)
    mask[0, 4:] = False  # padding at the end, as T5 captions come
    return x, t, TextCondition(tokens, mask)


def _kv(sampling, scale, layers):
    return {"sampling": sampling, "scale_factor": scale, "kv_compress_layer": layers}


# Every option PixArt-sigma defines, each with a latent size (odd grids) it runs at: (qk_norm, kv config, H, W).
OPTIONS = {
    "uniform": (False, _kv("uniform", 3, [0, 2, 3]), 18, 30),  # 9 x 15 grid -> 3 x 5 keys
    "ave": (False, _kv("ave", 2, [1, 3]), 14, 10),  # 7 x 5 -> 3 x 2 (nearest, floor)
    "uniform_every": (False, _kv("uniform_every", 5, [0, 1]), 14, 10),  # 35 tokens -> 7
    "conv": (False, _kv("conv", 2, [1, 2]), 14, 10),
    "qk_norm": (True, None, 10, 14),
    "qk_norm+conv": (True, _kv("conv", 3, [0, 3]), 14, 18),
    "qk_norm+ave": (True, _kv("ave", 3, [2]), 18, 14),
}
WEIGHTLESS = ("uniform", "ave", "uniform_every")
assert {kv["sampling"] for _, kv, _, _ in OPTIONS.values() if kv} == set(KV_SAMPLINGS)  # every sampling tested


def _load(name, ref, **kw):
    """The model users get: from_checkpoint on the reference's (PixArt-sigma's) state dict; the weightless
    samplings from an explicit kv_compress_config (what the weights cannot say)."""
    qk, kv, _, _ = OPTIONS[name]
    if kv is not None and kv["sampling"] in WEIGHTLESS:
        kw.setdefault("kv_compress_config", kv)
    return PixArt.from_checkpoint(ref.state_dict(), num_heads=HEADS, **kw)


def _plain_state(state):
    """The same weights without the option layers: the uncompressed, un-normed model's checkpoint."""
    return {k: v for k, v in state.items() if not any(p in k for p in (".attn.q_norm.", ".attn.k_norm.", ".attn.sr.",
                                                                      ".attn.norm."))}


# --------------------------------------------------------------------------------------------------
# Equivalence with the reference, every option, every exit depth
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_reference_matches_diffusers_without_options():
    """The reference is PixArt: without options it equals diffusers' PixArtTransformer2DModel (whose weights it
    loads through an independent diffusers -> PixArt-alpha mapping), so the comparisons below test the options."""
    from diffusers import PixArtTransformer2DModel

    from tests.models.test_pixart import _to_original

    theirs = randomize_(PixArtTransformer2DModel(
        num_attention_heads=HEADS, attention_head_dim=D // HEADS, in_channels=C_IN, out_channels=2 * C_IN,
        num_layers=DEPTH, cross_attention_dim=D, caption_channels=CAPTION, sample_size=BASE * PATCH,
        patch_size=PATCH, interpolation_scale=PE, use_additional_conditions=False), seed=3).eval()
    ref = RefPixArtMS()
    ref.load_state_dict(_to_original(theirs.state_dict(), ref.y_embedder.y_embedding, ref.pos_embed), strict=True)
    x, t, y = _inputs(14, 10)
    want = theirs(x, encoder_hidden_states=y.tokens, timestep=t, encoder_attention_mask=y.mask.long()).sample
    assert rel_err(ref(x, t, y), want) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_matches_reference_at_every_depth(name):
    qk, kv, H, W = OPTIONS[name]
    ref = _reference(qk, kv)
    model = _load(name, ref)
    assert model.qk_norm == qk and model.kv_compress_config == kv
    x, t, y = _inputs(H, W)
    outs = {}
    for d in range(1, DEPTH + 1):  # every exit depth; DEPTH is full depth
        outs[d] = model(x, t, y, depth=d)
        assert rel_err(outs[d], ref(x, t, y, depth=d)) <= 1e-5, d
    assert torch.equal(model(x, t, y), outs[DEPTH])
    # The option matters (guard): the same weights without it give another output (the issue measured 6%).
    plain = PixArt.from_checkpoint(_plain_state(ref.state_dict()), num_heads=HEADS)
    assert plain.kv_compress_config is None and not plain.qk_norm
    assert rel_err(plain(x, t, y), outs[DEPTH]) > 1e-3
    # Per-sample depths run each sample's blocks on its own grid.
    depth = torch.tensor([DEPTH, 1, 3])
    both = model(x, t, y, depth=depth)
    for i, d in enumerate(depth.tolist()):
        assert rel_err(both[i:i + 1], outs[d][i:i + 1]) <= 1e-5, (i, d)


@pytest.mark.skipif(not (INTERPRET or CUDA), reason="Triton needs a GPU or TRITON_INTERPRET=1")
@torch.no_grad()
@pytest.mark.parametrize("name", ["qk_norm+conv", "uniform"])
def test_triton_backend_matches_reference(name):
    qk, kv, H, W = OPTIONS[name]
    ref = _reference(qk, kv, seed=4)
    model = _load(name, ref)
    x, t, y = _inputs(H, W, B=2)
    with eekernels.backend("triton"):
        out = model(x, t, y, depth=torch.tensor([DEPTH, 2]))
    assert rel_err(out[:1], ref(x[:1], t[:1], y.index(slice(0, 1)))) <= 1e-5
    assert rel_err(out[1:], ref(x[1:], t[1:], y.index(slice(1, 2)), depth=2)) <= 1e-5


@pytest.mark.parametrize("name", ["qk_norm+conv", "ave"])
def test_bf16_autocast_and_training(name):
    qk, kv, H, W = OPTIONS[name]
    ref = _reference(qk, kv)
    model = _load(name, ref)
    x, t, y = _inputs(H, W)
    assert_bf16_autocast_close(model, lambda x, t, y, depth=None: ref(x, t, y, depth=depth or DEPTH), x, t, y, 3)
    model(x, t, y, depth=DEPTH).square().mean().backward()
    attn = model.blocks[0 if qk else 1].attn
    assert attn.qkv.weight.grad.abs().max() > 0
    if qk:
        assert attn.q_norm.weight.grad.abs().max() > 0 and model.blocks[3].attn.sr.weight.grad.abs().max() > 0


# --------------------------------------------------------------------------------------------------
# The paths users load by: weights, explicit kwargs, the PixArt-sigma config (dict or .py), files
# --------------------------------------------------------------------------------------------------
_BASE_CONFIG = """\
data_root = '/data/data'
data = dict(type='InternalData', root='images', transform='default_train')
model = 'PixArt_XL_2'
pe_interpolation = 1.0
# qk norm
qk_norm = False
# kv token compression
kv_compress = False
kv_compress_config = {
    'sampling': None,
    'scale_factor': 1,
    'kv_compress_layer': [],
}
"""


def _config_files(tmp_path, kv, qk_norm=False, on=True):
    (tmp_path / "configs" / "sigma").mkdir(parents=True, exist_ok=True)
    (tmp_path / "configs" / "PixArt_xl2_internal.py").write_text(_BASE_CONFIG)
    path = tmp_path / "configs" / "sigma" / "PixArt_sigma_tiny_kvcompress.py"
    path.write_text(f"_base_ = ['../PixArt_xl2_internal.py']\nimage_size = 2048\nmodel = 'PixArtMS_XL_2'\n"
                    f"qk_norm = {qk_norm}\nkv_compress = {on}\nkv_compress_config = {kv!r}\n")
    return path


@torch.no_grad()
@pytest.mark.parametrize("name", ["uniform", "qk_norm+ave"])
def test_weightless_sampling_from_kwargs_config_dict_and_config_file(tmp_path, name):
    qk, kv, H, W = OPTIONS[name]
    ref = _reference(qk, kv, seed=5)
    x, t, y = _inputs(H, W)
    want = ref(x, t, y)
    state = ref.state_dict()
    torch.save({"state_dict": state}, tmp_path / "PixArt-Sigma-tiny.pth")  # the release nesting
    save_state(state, tmp_path / "PixArt-Sigma-tiny.safetensors")
    config_py = _config_files(tmp_path, kv, qk)
    loads = {
        "kwargs": lambda: PixArt.from_checkpoint(state, num_heads=HEADS, kv_compress_config=kv),
        "config dict": lambda: PixArt.from_checkpoint(state, num_heads=HEADS, config=dict(
            qk_norm=qk, kv_compress=True, kv_compress_config=kv, model_max_length=300)),
        "config file, .pth": lambda: PixArt.from_checkpoint(tmp_path / "PixArt-Sigma-tiny.pth", num_heads=HEADS,
                                                            config=config_py),
        "config file, .safetensors": lambda: PixArt.from_checkpoint(
            str(tmp_path / "PixArt-Sigma-tiny.safetensors"), num_heads=HEADS, config=str(config_py)),
    }
    for how, load in loads.items():
        model = load()
        assert model.kv_compress_config == kv and model.qk_norm == qk, how
        assert rel_err(model(x, t, y), want) <= 1e-5, how
    # kv_compress = False turns the config's kv_compress_config off, as in PixArt-sigma's scripts
    off = PixArt.from_checkpoint(state, num_heads=HEADS, config=_config_files(tmp_path, kv, qk, on=False))
    assert off.kv_compress_config is None and rel_err(off(x, t, y), want) > 1e-3
    # explicit kwargs win over the config
    model = PixArt.from_checkpoint(state, num_heads=HEADS, config=config_py, kv_compress_config=None)
    assert model.kv_compress_config is None
    # The base file alone: PixArt-sigma's defaults (nothing on)
    base = PixArt.from_checkpoint(_plain_state(state), num_heads=HEADS,
                                  config=tmp_path / "configs" / "PixArt_xl2_internal.py")
    assert base.kv_compress_config is None and not base.qk_norm


@torch.no_grad()
@pytest.mark.parametrize("name", ["conv", "qk_norm", "qk_norm+conv"])
def test_weighted_options_are_read_from_the_weights(tmp_path, name):
    qk, kv, H, W = OPTIONS[name]
    ref = _reference(qk, kv, seed=6)
    x, t, y = _inputs(H, W)
    want = ref(x, t, y, depth=2)
    path = tmp_path / "sigma.safetensors"
    save_state(ref.state_dict(), path)
    for model in (PixArt.from_checkpoint(path, num_heads=HEADS),  # nothing but the file
                  PixArt.from_checkpoint(ref.state_dict(), num_heads=HEADS, config=_config_files(tmp_path, kv, qk,
                                                                                                  on=kv is not None)),
                  PixArt.from_checkpoint(ref.state_dict(), num_heads=HEADS, qk_norm=qk, kv_compress_config=kv)):
        assert model.qk_norm == qk and model.kv_compress_config == kv
        assert rel_err(model(x, t, y, depth=2), want) <= 1e-5
    # Round trips: the original layout key for key, and the own state dict
    back = model.state_dict_in()
    orig = {k: v for k, v in ref.state_dict().items()}
    assert set(back) == set(orig) and all(torch.equal(back[k], orig[k]) for k in orig)
    own = PixArt.from_checkpoint(model.state_dict(), num_heads=HEADS)
    assert own.kv_compress_config == kv and torch.equal(own(x, t, y), model(x, t, y))


def test_named_configs_say_what_they_use():
    for name, cfg in PIXART_CONFIGS.items():
        assert cfg["qk_norm"] is False and cfg["kv_compress_config"] is None, name  # as every release
    with torch.device("meta"):
        model = PixArt.from_config("PixArt-Sigma-XL/2-1024", depth=2)
    assert not model.qk_norm and model.kv_compress_config is None
    assert all(type(b.attn) is L.Attention for b in model.blocks)  # the plain attention, as before
    with torch.device("meta"):
        kv = PixArt.from_config("PixArt-Sigma-XL/2-1024", kv_compress_config=_kv("conv", 2, [1]), depth=2)
    # PixArt-sigma's conv init: an average (1/s^2), and the scale_factor 1 / no layers configs compress nothing
    assert kv.blocks[1].attn.sr.weight.shape == (1152, 1, 2, 2) and not hasattr(kv.blocks[0].attn, "sr")
    tiny = dict(sample_size=8, hidden_size=24, depth=2, num_heads=3, caption_channels=8)
    conv = PixArt(**tiny, kv_compress_config=_kv("conv", 2, [0]))
    assert torch.equal(conv.blocks[0].attn.sr.weight, torch.full((24, 1, 2, 2), 0.25))
    for nothing in (_kv("conv", 1, [0, 1]), _kv("uniform", 2, []), _kv(None, 1, [])):
        assert PixArt(**tiny, kv_compress_config=nothing).kv_compress_config is None


# --------------------------------------------------------------------------------------------------
# diffusers has no such option: nothing to mismatch silently there
# --------------------------------------------------------------------------------------------------
def test_diffusers_has_no_qk_norm_or_kv_compression_and_refuses_both():
    from diffusers import PixArtTransformer2DModel

    params = set(inspect.signature(PixArtTransformer2DModel.__init__).parameters)
    assert not params & {"qk_norm", "kv_compress", "kv_compress_config", "sampling", "sr_ratio", "scale_factor"}
    theirs = PixArtTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=D // HEADS, in_channels=C_IN,
                                      num_layers=2, cross_attention_dim=D, caption_channels=CAPTION, sample_size=8)
    assert all(b.attn1.norm_q is None and b.attn1.norm_k is None for b in theirs.transformer_blocks)
    model = PixArt.from_diffusers(theirs)
    assert not model.qk_norm and model.kv_compress_config is None
    with pytest.raises(ValueError, match="`kv_compress_config` expected unset"):
        PixArt.from_diffusers(theirs, kv_compress_config=_kv("uniform", 2, [0]))
    with pytest.raises(ValueError, match="`qk_norm` expected unset"):
        PixArt.from_diffusers(theirs, qk_norm=True)
    theirs.register_to_config(qk_norm=True)  # a diffusers that grew the option would not be ignored
    with pytest.raises(ValueError, match="qk_norm"):
        PixArt.from_diffusers(theirs)
    # A model with either option has no diffusers layout
    ref = _reference(True, _kv("conv", 2, [1]))
    for model in (_load("qk_norm+conv", ref), _load("uniform", _reference(False, OPTIONS["uniform"][1]))):
        on = "qk_norm" if model.qk_norm else "kv_compress_config"
        with pytest.raises(ValueError, match=f"cannot hold this model's .*{on}"):
            model.state_dict_in("diffusers")
    with pytest.raises(ValueError, match="`qk_norm`"):
        convert_pixart.original_to_diffusers("test", ref.state_dict())
    # diffusers' convert_pixart_sigma_to_diffusers.py --qk_norm writes attn1.q_norm keys no diffusers model loads
    dstate = {**theirs.state_dict(), "transformer_blocks.0.attn1.q_norm.weight": torch.ones(D)}
    with pytest.raises(ValueError, match="`qk_norm`"):
        PixArt.from_checkpoint(dstate, num_heads=HEADS, sample_size=8)


# --------------------------------------------------------------------------------------------------
# Refusals, each naming the option
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_bad_options_are_refused_by_name(tmp_path):
    tiny = dict(sample_size=8, hidden_size=24, depth=3, num_heads=3, caption_channels=8)
    bad = [
        (_kv("bilinear", 2, [0]), r"\['sampling'\]` expected one of .*'bilinear'.*not implemented"),
        (_kv("avg", 2, [0]), r"\['sampling'\].*'avg'"),
        (_kv("uniform", 1.5, [0]), r"\['scale_factor'\]` expected an integer >= 1, got 1.5"),
        (_kv("uniform", True, [0]), r"\['scale_factor'\]"),
        (_kv("uniform", 0, [0]), r"\['scale_factor'\]"),
        (_kv("uniform", 2, [3]), r"\['kv_compress_layer'\]` expected a list of block indices in \[0, 3\)"),
        (_kv("uniform", 2, [-1]), r"\['kv_compress_layer'\]"),
        (_kv("uniform", 2, "0"), r"\['kv_compress_layer'\]"),
        (_kv(None, 2, [0]), r"\['sampling'\]` expected one of .* to compress blocks \[0\] by 2, got None"),
        ({"sampling": "uniform", "scale_factor": 2},
         r"`kv_compress_config` expected the keys .*missing \['kv_compress_layer'\]"),
        ({**_kv("uniform", 2, [0]), "stride": 2}, r"unknown \['stride'\]"),
        ([("sampling", "uniform")], "`kv_compress_config` expected None or a dict"),
    ]
    for kv, msg in bad:
        with pytest.raises(ValueError, match=msg):
            PixArt(**tiny, kv_compress_config=kv)
    with pytest.raises(ValueError, match="`qk_norm` expected a bool"):
        PixArt(**tiny, qk_norm="layer_norm")
    # Grids PixArt-sigma cannot compress (it fails on them): refused before any block runs
    grids = [(_kv("uniform", 3, [1]), (12, 10), r"multiples of 3 .*'uniform' sampling by 3.*got H, W = 12, 10"),
             (_kv("ave", 3, [1]), (4, 12), r"sides of at least 3 .*'ave'.*a 2 x 6 grid"),
             (_kv("conv", 4, [0]), (12, 6), r"sides of at least 4 .*'conv'"),
             (_kv("uniform_every", 4, [2]), (6, 10), r"patch count that is a multiple of 4")]
    for kv, (H, W), msg in grids:
        model = PixArt(**tiny, kv_compress_config=kv)
        with pytest.raises(ValueError, match=msg):
            model(torch.randn(1, 4, H, W), torch.tensor([10.0]), TextCondition(torch.randn(1, 3, 8)))

    # The weights and the caller disagree
    ref = _reference(True, _kv("conv", 2, [1, 2]))
    state = ref.state_dict()

    def fails(msg, st=state, **kw):
        with pytest.raises(ValueError, match=msg):
            PixArt.from_checkpoint(st, num_heads=HEADS, **kw)

    fails(r"`qk_norm` is False, but the checkpoint holds", qk_norm=False)
    fails(r"`qk_norm` is True, but the checkpoint has no", st=_plain_state(state), qk_norm=True)
    fails(r"`qk_norm` expected a bool", qk_norm=1)
    fails(r"`kv_compress_config` .*'uniform'.* does not fit .* 'conv' compression of blocks \[1, 2\] by 2",
          kv_compress_config=_kv("uniform", 2, [1, 2]))
    fails(r"`kv_compress_config` .* does not fit", kv_compress_config=_kv("conv", 3, [1, 2]))
    fails(r"`kv_compress_config` .* does not fit", kv_compress_config=None)
    fails(r"`kv_compress_config` .* does not fit .* no 'conv' compression weights", st=_plain_state(state),
          kv_compress_config=_kv("conv", 2, [1, 2]))
    fails(r"'blocks.i.attn.sr.weight' .* expected one shape \(36, 1, s, s\)",
          st={**state, "blocks.2.attn.sr.weight": torch.ones(D, 1, 3, 3)})
    fails(r"missing 2 key.*blocks.1.attn.norm", st={k: v for k, v in state.items() if ".1.attn.norm." not in k})
    # Configs that do not say what runs
    fails(r"kv_compress_config but no kv_compress flag", config={"kv_compress_config": _kv("conv", 2, [1, 2])})
    fails(r"kv_compress = True but no kv_compress_config", config={"kv_compress": True})
    fails(r"`config\['kv_compress'\]` expected a bool", config={"kv_compress": "yes"})
    fails(r"`config` expected a PixArt-sigma config", config=42)
    fails(r"`config` file .* not found", config=tmp_path / "nope.py")
    evil = tmp_path / "evil.py"
    marker = tmp_path / "RAN"
    evil.write_text(f"kv_compress = __import__('pathlib').Path({str(marker)!r}).touch() or True\n")
    fails(r"`config` entry 'kv_compress' expected a literal", config=evil)
    assert not marker.exists()  # read, never run
    (tmp_path / "loop.py").write_text("_base_ = 'loop.py'\n")
    fails(r"`_base_` files nest deeper than 8", config=tmp_path / "loop.py")
    (tmp_path / "broken.py").write_text("kv_compress = (\n")
    fails(r"is not a Python config file", config=tmp_path / "broken.py")
