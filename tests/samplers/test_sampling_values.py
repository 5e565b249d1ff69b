"""Values, not just shapes: caption masks are 0/1, noise and condition tensors are finite, both refused by name
before any model call; samples that come out non-finite all the same are returned with a warning that says how
many and which. Inputs are never modified."""
import math
import warnings

import pytest
import torch

from eekernels.calibration import calibrate
from eekernels.models import DiT, TextCondition
from eekernels.models.condition import check_text_condition
from eekernels.samplers import NonFiniteSampleWarning, sample
from tests.samplers._toys import TextToy, ToyModel, text_condition
from tests.utils import tiny_text_model


def _noise(batch=2, seed=0):
    return torch.randn(batch, 3, 5, 5, generator=torch.Generator().manual_seed(seed))


def _refused(match, model, noise, y=None, **kw):
    copies = [noise.clone()] + ([v.clone() for v in y.tensors().values()] if isinstance(y, TextCondition) else [])
    with pytest.raises(ValueError, match=match):
        sample(model, noise, y, steps=3, **kw)
    assert model.calls == [], "the model ran before the input was refused"
    after = [noise] + (list(y.tensors().values()) if isinstance(y, TextCondition) else [])
    torch.testing.assert_close(after, copies, rtol=0, atol=0, equal_nan=True)  # inputs not modified


# ---- caption masks: 0/1 only -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.float32, torch.float16])
def test_integer_and_float_01_masks_are_the_bool_mask(dtype):
    y = text_condition()
    want = sample(TextToy(seed=1), _noise(), y, steps=3)
    got = sample(TextToy(seed=1), _noise(), TextCondition(y.tokens, y.mask.to(dtype), y.pooled), steps=3)
    assert torch.equal(got, want)


@pytest.mark.parametrize("value,dtype,shown", [(2, torch.int64, "2"), (-1, torch.int64, "-1"),
                                               (255, torch.uint8, "255"), (0.5, torch.float32, "0.5"),
                                               (math.nan, torch.float32, "nan"), (math.inf, torch.float32, "inf")])
def test_mask_values_other_than_01_refused(value, dtype, shown):
    y = text_condition()
    mask = y.mask.to(dtype)
    mask[1, 0] = value
    match = rf"sample: `y.mask` expected 0/1 values \(1: a real token, 0: padding\) or a bool tensor, got 1 other " \
            rf"value\(s\), e.g. {shown}"
    _refused(match, TextToy(seed=2), _noise(), TextCondition(y.tokens, mask, y.pooled))
    neg = text_condition(seed=5)
    nmask = neg.mask.to(dtype)
    nmask[0, 1] = value
    _refused(match.replace("`y.", "`negative."), TextToy(seed=2, null=False), _noise(), y, cfg_scale=2.0,
             negative=TextCondition(neg.tokens, nmask, neg.pooled))


def test_model_forward_refuses_mask_values_on_the_cpu():
    """A text model called directly checks a CPU mask's values too (no device sync is needed there)."""
    model = tiny_text_model("pixart")
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0])
    tok, mask = torch.randn(2, 6, 12), torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 2, 1, 0, 0]])
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"PixArt: `y.mask` expected 0/1 values .* e.g. 2"):
            model(x, t, TextCondition(tok, mask))
        torch.testing.assert_close(model(x, t, TextCondition(tok, mask.clamp(max=1).float())),
                                   model(x, t, TextCondition(tok, mask.clamp(max=1).bool())), rtol=0, atol=0)


def test_check_text_condition_values_flag_and_no_sync_default():
    y = text_condition()
    bad = TextCondition(y.tokens.clone(), y.mask, y.pooled)
    bad.tokens[0, 0, 0] = math.nan
    kw = dict(batch=2, token_dim=6, device="cpu", pooled_dim=4)
    check_text_condition("f", bad, **kw)  # shapes only by default: a model's forward does not scan its inputs
    with pytest.raises(ValueError, match=r"f: `y.tokens` expected finite values, got 1 NaN and 0 Inf among 60 values"):
        check_text_condition("f", bad, values=True, **kw)


# ---- non-finite inputs -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nonfinite_noise_refused(bad):
    noise = _noise()
    noise[1, 2, 3, 4] = bad
    nan, inf = (1, 0) if math.isnan(bad) else (0, 1)
    match = rf"sample: `noise` expected finite values, got {nan} NaN and {inf} Inf among 150 values"
    _refused(match, ToyModel(), noise, torch.tensor([0, 1]))
    _refused(match, TextToy(seed=3), noise, text_condition())
    _refused(match, ToyModel(num_classes=None), noise, sampler="flow_euler")


@pytest.mark.parametrize("field", ["tokens", "pooled", "guidance"])
def test_nonfinite_condition_refused(field):
    y = text_condition(guidance=3.5)
    bad = TextCondition(y.tokens.clone(), y.mask, y.pooled.clone(), {"guidance": y.extra["guidance"].clone()})
    target = {"tokens": bad.tokens, "pooled": bad.pooled, "guidance": bad.extra["guidance"]}[field]
    target.view(-1)[0] = math.nan
    target.view(-1)[-1] = math.inf
    name = {"tokens": "y.tokens", "pooled": "y.pooled", "guidance": r"y.extra\['guidance'\]"}[field]
    match = rf"sample: `{name}` expected finite values, got 1 NaN and 1 Inf among {target.numel()} values"
    _refused(match, TextToy(seed=4, guidance=True), _noise(), bad)
    _refused(match.replace("`y.", "`negative."), TextToy(seed=4, guidance=True, null=False), _noise(), y,
             cfg_scale=2.0, negative=bad)
    _refused(match.replace("`y.", "`negative."), TextToy(seed=4, guidance=True, null=False), _noise(), y,
             cfg_scale=1.0, negative=bad)  # validated even where unused


def test_calibrate_refuses_nonfinite_inputs_before_any_call():
    model = TextToy(seed=6)
    noise = _noise(batch=3)
    noise[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"`noise` expected finite values, got 1 NaN"):
        calibrate(model, sampler="ddim", steps=3, budget=0.7, noises=noise, conditions=text_condition(batch=3))
    y = text_condition(batch=3)
    y.tokens[2, 1, 0] = math.inf
    with pytest.raises(ValueError, match=r"`y.tokens` expected finite values, got 0 NaN and 1 Inf"):
        calibrate(model, sampler="ddim", steps=3, budget=0.7, noises=_noise(batch=3), conditions=y)
    assert model.calls == []


# ---- non-finite output: a warning that counts ------------------------------------------------------------------------

def _nan_weights_dit(rows):
    """A tiny DiT whose class embedding is NaN for the labels in ``rows``: those samples come out NaN."""
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10,
            learn_sigma=False).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        m.y_embedder.embedding_table.weight[rows] = math.nan
    return m


def test_nonfinite_output_warns_with_the_count():
    model = _nan_weights_dit([3])
    noise = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([1, 3, 2, 3, 4])
    with pytest.warns(NonFiniteSampleWarning, match=r"eekernels.sample: 2 of 5 samples are not finite \(NaN or Inf\): "
                                                    r"samples 1, 3\. The inputs were finite, so the run produced "
                                                    r"them: check the model's weights for NaN/Inf$"):
        out = sample(model, noise, y, steps=3)
    finite = torch.isfinite(out).flatten(1).all(1)
    assert finite.tolist() == [True, False, True, False, True]  # returned as they are, the good ones kept
    # Without the NaN row (CFG's null class included) every sample is finite and nothing is said.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(model, noise, torch.tensor([1, 2, 0, 4, 5]), steps=3, cfg_scale=1.5)
    with warnings.catch_warnings():  # the documented way to make it an error
        warnings.simplefilter("error", NonFiniteSampleWarning)
        with pytest.raises(NonFiniteSampleWarning, match="1 of 1 samples"):
            sample(model, noise[:1], torch.tensor([3]), steps=2)


def test_float16_overflow_warns():
    """Finite float16 noise whose trajectory leaves float16's range (about 65504): DDIM with eps = 0 ends at
    x0 = noise / sqrt(alpha_bar(t_first)) (about 150x the noise), which is Inf in the float16 result."""
    noise = torch.full((3, 3, 5, 5), 5e4, dtype=torch.float16)
    noise[1] = 1.0
    with pytest.warns(NonFiniteSampleWarning, match=r"2 of 3 samples are not finite \(NaN or Inf\): samples 0, 2\. "
                                                    r".*; or float16 overflow \(model calls in torch.float16, "
                                                    r"result in torch.float16\): try float32 or bfloat16"):
        out = sample(lambda x, t, y: torch.zeros_like(x), noise, sampler="ddim", steps=2)
    assert out.dtype == torch.float16 and torch.isfinite(out[1]).all() and torch.isinf(out[0]).all()
