"""U-ViT against a plain baofff/U-ViT-layout implementation, at full and truncated depths."""
import pytest
import torch

import eekernels
from eekernels.models import UVIT_CONFIGS, ExitCache, UViT
from tests.models._reference_models import RefUViT, assert_bf16_autocast_close, randomize_, rel_err
from tests.utils import CUDA, INTERPRET

# Reference kwargs (baofff names; num_classes counts the table rows, the null label included).
COND = dict(img_size=8, patch_size=2, in_chans=4, embed_dim=48, depth=4, num_heads=3, num_classes=11)
UNCOND = dict(img_size=8, patch_size=2, in_chans=3, embed_dim=48, depth=5, num_heads=2, num_classes=-1)


def _pair(seed=0, **kw):
    ref = randomize_(RefUViT(**kw), seed=seed).eval()
    return ref, UViT.from_checkpoint(ref.state_dict(), num_heads=kw["num_heads"]).eval()


def _inputs(B=3, C=4, classes=10):
    return torch.randn(B, C, 8, 8), torch.rand(B) * 999, torch.randint(0, classes, (B,))


# --------------------------------------------------------------------------------------------------
# Equivalence and truncation semantics
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
@pytest.mark.parametrize("variant", [
    dict(), dict(qkv_bias=True), dict(mlp_time_embed=True), dict(conv=False), dict(qkv_bias=True, conv=False),
])
@pytest.mark.parametrize("depth", [None, 3, 4])
def test_class_conditional_matches_reference(variant, depth):
    ref, model = _pair(**COND, **variant)
    assert (model.num_blocks, model.min_depth, model.num_classes, model.null_class) == (5, 3, 10, 10)
    x, t, y = _inputs()
    assert rel_err(model(x, t, y, depth=depth), ref(x, t, y, depth=depth)) <= 1e-5


@torch.no_grad()
@pytest.mark.parametrize("depth", [None, 3, 4])
def test_unconditional_matches_reference(depth):
    ref, model = _pair(seed=2, **UNCOND)  # depth 5 -> 2 in_blocks, mid, 2 out_blocks
    assert (model.num_blocks, model.num_classes, model.null_class, model.extras) == (5, None, None, 1)
    x, t, _ = _inputs(C=3)
    assert rel_err(model(x, t, depth=depth), ref(x, t, depth=depth)) <= 1e-5


@torch.no_grad()
def test_depths_differ_and_null_label_default():
    ref, model = _pair(**COND)
    x, t, y = _inputs()
    assert rel_err(model(x, t, y, depth=3), model(x, t, y)) > 1e-2
    assert rel_err(model(x, t), ref(x, t, torch.full((3,), 10))) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@torch.no_grad()
def test_low_precision_within_twice_torch_error(dtype):
    ref, model = _pair(**COND)
    x, t, y = _inputs()
    want = ref.double()(x.double(), t, y, depth=4)
    base = rel_err(ref.to(dtype)(x.to(dtype), t, y, depth=4), want)
    out = model.to(dtype)(x.to(dtype), t, y, depth=4)
    assert out.dtype == dtype
    assert rel_err(out, want) <= 2 * base + 1e-4, (rel_err(out, want), base)


@pytest.mark.parametrize("depth", [None, torch.tensor([5, 3, 4])])
def test_bf16_autocast_close_to_fp32(depth):
    ref, model = _pair(**COND, mlp_time_embed=True)
    assert not UViT.from_checkpoint(ref.state_dict(), num_heads=3).training  # loaders return eval mode
    assert_bf16_autocast_close(model, ref, *_inputs(), depth)


def test_gradients_match_reference():
    ref, model = _pair(**COND)
    x, t, y = _inputs(B=2)
    ref(x, t, y, depth=4).square().mean().backward()
    model(x, t, y, depth=4).square().mean().backward()
    for name in ("out_blocks.0.mlp.fc1.weight", "out_blocks.1.skip_linear.weight", "in_blocks.0.norm1.weight"):
        got, want = model.get_parameter(name).grad, ref.get_parameter(name).grad
        assert rel_err(got, want) <= 1e-4, name
    assert model.out_blocks[1].attn.qkv.weight.grad is None  # past the exit: only skip_linear ran


@torch.no_grad()
def test_per_sample_equals_solo():
    ref, model = _pair(**COND)
    x, t, y = _inputs(B=5)
    depth = torch.tensor([4, 3, 5, 3, 4])
    out = model(x, t, y, depth=depth)
    for i in range(5):
        solo = model(x[i : i + 1], t[i : i + 1], y[i : i + 1], depth=int(depth[i]))
        assert rel_err(out[i : i + 1], solo) <= 1e-5, i


@torch.no_grad()
def test_exit_cache():
    _, model = _pair(**COND)
    x, t, y = _inputs()
    cache = ExitCache([3, 4])
    full = model(x, t, y, exit_cache=cache)
    for d in (3, 4):  # same inputs: truncated hidden + recorded (h_L - h_d) gives the full output back
        assert rel_err(model(x, t, y, depth=d, exit_cache=cache), full) <= 1e-5
    with pytest.raises(ValueError, match="per-sample"):
        model(x, t, y, depth=torch.tensor([3, 4, 5]), exit_cache=cache)


# --------------------------------------------------------------------------------------------------
# Errors and configs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth, match", [
    (2, r"\[3, 5\].*got 2"), (6, r"\[3, 5\].*got 6"), (torch.tensor([3, 2, 5]), "got 2"),
    (torch.tensor([3.0, 4.0, 5.0]), "integer tensor"),
])
def test_bad_depth(depth, match):
    _, model = _pair(**COND)
    with pytest.raises(ValueError, match=match):
        model(*_inputs(), depth=depth)


def test_bad_checkpoints(tmp_path):
    ref, _ = _pair(**COND)
    sd = ref.state_dict()
    with pytest.raises(ValueError, match=r"missing .*out_blocks\.1\.skip_linear\.weight"):
        UViT.from_checkpoint({k: v for k, v in sd.items() if k != "out_blocks.1.skip_linear.weight"}, 3)
    with pytest.raises(ValueError, match=r"mid_block\.mlp\.fc2\.bias.*\(47,\).*\(48,\)"):
        UViT.from_checkpoint(dict(sd, **{"mid_block.mlp.fc2.bias": torch.zeros(47)}), 3)
    with pytest.raises(ValueError, match="pass num_heads="):
        UViT.from_checkpoint(sd)
    with pytest.raises(ValueError, match="unknown config 'U-ViT-X/2'"):
        UViT.from_config("U-ViT-X/2")
    junk = tmp_path / "nnet_ema.pth"
    junk.write_bytes(b"\x00\x01 definitely not a zip or pickle")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        UViT.from_checkpoint(junk, 3)
    path = tmp_path / "nnet.pth"
    torch.save(sd, path)
    assert UViT.from_checkpoint(path, 3).num_blocks == 5


def test_named_configs():
    assert UVIT_CONFIGS["U-ViT-H/2"]["embed_dim"] == 1152 and UVIT_CONFIGS["U-ViT-H/2"]["depth"] == 28
    with torch.device("meta"):
        m = UViT.from_config("U-ViT-H/2")
    assert (m.num_blocks, m.min_depth, m.num_classes, m.null_class, m.input_size) == (29, 15, 1000, 1000, 32)
    assert m.label_emb.weight.shape == (1001, 1152) and isinstance(m.final_layer, torch.nn.Identity)


@pytest.mark.skipif(not (INTERPRET or CUDA), reason="Triton needs a GPU or TRITON_INTERPRET=1")
@torch.no_grad()
def test_triton_backend_matches():
    ref, model = _pair(**dict(COND, embed_dim=24, depth=2, num_heads=2, img_size=4))
    x, t, y = torch.randn(2, 4, 4, 4), torch.rand(2) * 999, torch.tensor([1, 7])
    with eekernels.backend("triton"):
        out = model(x, t, y, depth=torch.tensor([2, 3]))
    assert rel_err(out[:1], ref(x[:1], t[:1], y[:1], depth=2)) <= 1e-5
    assert rel_err(out[1:], ref(x[1:], t[1:], y[1:], depth=3)) <= 1e-5
