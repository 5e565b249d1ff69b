"""Bad input raises ValueError naming the problem, before the model is called."""
import pytest
import torch

from eekernels.graphs import GraphedModel
from eekernels.samplers import DDIM, sample
from tests.samplers._toys import ToyModel, ToySchedule, relerr


def _raises(match, model=None, noise=None, y="default", **kw):
    model = model or ToyModel()
    noise = torch.randn(2, 3, 5, 5) if noise is None else noise
    y = torch.tensor([0, 1]) if isinstance(y, str) else y
    with pytest.raises(ValueError, match=match):
        sample(model, noise, y, **kw)
    assert getattr(model, "calls", []) == [], "the model ran before the input was rejected"


def test_unknown_sampler():
    _raises(r"sampler: expected one of \['ddim', 'ddpm', 'dpmsolver\+\+', 'euler', 'flow_dpmsolver\+\+', 'flow_euler', "
            r"'flow_heun', 'heun'\], got 'plms'",
            sampler="plms")


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10"])
def test_bad_steps(steps):
    _raises("steps: expected an integer >= 1", steps=steps)


def test_steps_beyond_training_steps():
    _raises("steps: expected at most num_train_timesteps=100", steps=101, num_train_timesteps=100)


def test_noise_label_batch_mismatch():
    _raises(r"y: expected one label per sample, batch 2 \(noise\), got 3 labels", y=torch.tensor([0, 1, 2]))


def test_bad_labels():
    _raises("y: expected integer class labels", y=torch.tensor([0.0, 1.0]))
    _raises("y: expected integer class labels", y=torch.tensor([[0, 1]]))
    model = ToyModel()
    model.null_class = None
    _raises("y: the model is class-conditional", model=model, y=None)


def test_bad_noise():
    _raises("noise: expected a floating tensor", noise=torch.zeros(2, 3, 5, 5, dtype=torch.int64))
    _raises("noise: expected a floating tensor", noise=torch.randn(5))
    _raises(r"noise: expected 3 channels \(model.in_channels\)", noise=torch.randn(2, 4, 5, 5))


def test_noise_of_the_wrong_spatial_size():
    """Named as `noise` by sample(), not as the model's `x` at its first call."""
    from eekernels.models import DiT
    from tests.utils import tiny_text_model

    dit = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    with pytest.raises(ValueError, match=r"noise: expected spatial size 8 x 8 \(model.input_size\), got shape "
                                         r"\(2, 3, 6, 6\)"):
        sample(dit, torch.randn(2, 3, 6, 6), torch.tensor([0, 1]), steps=2)
    flux = tiny_text_model("flux")
    with pytest.raises(ValueError, match=r"noise: expected H and W divisible by 2 \(model.input_multiple\), got "
                                         r"shape \(1, 4, 6, 5\)"):
        sample(flux, torch.randn(1, 4, 6, 5), None, sampler="flow_euler", steps=2)


def test_schedule_deeper_than_model():
    _raises("schedule: total_depth 6 is deeper than the model", model=ToyModel(num_blocks=4),
            schedule=ToySchedule([6, 4, 2]))


def test_schedule_plan_out_of_range():
    class Broken(ToySchedule):
        def plan(self, timesteps):
            return torch.zeros(len(timesteps), dtype=torch.int64)

    _raises(r"schedule: depth 0 at call 0 .* outside \[1, 4\]", schedule=Broken([4]))


def test_cfg_on_unconditional_model():
    _raises(r"cfg_scale: 2.0 != 1 needs a class-conditional model", model=ToyModel(num_classes=None), y=None,
            cfg_scale=2.0)
    _raises("y: classifier-free guidance", y=None, cfg_scale=2.0)


def test_unknown_solver_option_lists_valid_ones():
    _raises(r"ddim: unknown solver option\(s\) \['order'\]; valid options: .*'eta'.*'timestep_spacing'", order=2)
    _raises(r"euler: unknown solver option\(s\) \['eta'\]", sampler="euler", eta=0.5)
    with pytest.raises(ValueError, match="unknown solver option"):
        DDIM(steps=5, solver_order=2)


@pytest.mark.parametrize("options,match", [
    (dict(beta_schedule="cosine"), "beta_schedule: expected one of"),
    (dict(timestep_spacing="uniform"), "timestep_spacing: expected one of"),
    (dict(eta=-0.1), "eta: expected >= 0"),
    (dict(beta_start=0.1, beta_end=0.01), "beta_start, beta_end"),
    (dict(sampler="dpmsolver++", solver_order=3), "solver_order: expected 1 or 2"),
    (dict(sampler="ddpm", variance_type="learned"), "variance_type: expected one of"),
])
def test_bad_option_values(options, match):
    _raises(match, **options)


def test_exit_policy_and_graphs():
    _raises("exit_policy: expected one of", exit_policy="zero")
    _raises("graphs: CUDA graphs need CUDA tensors", graphs=True)


def test_learned_range_needs_learned_sigma():
    with pytest.raises(ValueError, match="learned-sigma model"):
        sample(ToyModel(learn_sigma=False), torch.randn(2, 3, 5, 5), torch.tensor([0, 1]), sampler="ddpm", steps=3,
               variance_type="learned_range")


def test_model_output_shape_checked():
    def bad(x, t, y, depth=None):
        return torch.zeros(x.shape[0], 5, *x.shape[2:])

    with pytest.raises(ValueError, match=r"model output: expected shape \(B, 3 or 6, \.\.\.\)"):
        sample(bad, torch.randn(2, 3, 5, 5), None, steps=2)


def test_graphed_model_bad_inputs():
    model = ToyModel()
    with pytest.raises(ValueError, match="enabled: CUDA graphs need a CUDA model"):
        GraphedModel(model, 2, [4], enabled=True)
    with pytest.raises(ValueError, match=r"GraphedModel: depths: `depth` expected values in \[1, 4\] \(this model.s depth range\), got 7"):
        GraphedModel(model, 2, [7])
    with pytest.raises(ValueError, match="batch_size"):
        GraphedModel(model, 0)
    g = GraphedModel(model, 2, [4, 2])
    with pytest.raises(ValueError, match=r"depth: expected one of the captured depths \(4, 2\), got 3"):
        g(torch.randn(2, 3, 5, 5), torch.ones(2), torch.tensor([0, 1]), depth=3)
    with pytest.raises(ValueError, match=r"x: expected shape \(2, 3, 5, 5\)"):
        g(torch.randn(3, 3, 5, 5), torch.ones(3), torch.tensor([0, 1, 2]), depth=4)
    with pytest.raises(ValueError, match="y: expected labels"):
        g(torch.randn(2, 3, 5, 5), torch.ones(2), None, depth=4)


# ---- hardening: labels, cfg, schedule, noise, generator -------------------------------------------------------------

def _raises_type(match, **kw):
    model = ToyModel()
    with pytest.raises(TypeError, match=match):
        sample(model, torch.randn(2, 3, 5, 5), torch.tensor([0, 1]), **kw)
    assert model.calls == [], "the model ran before the input was rejected"


@pytest.mark.parametrize("labels,bad", [([0, 6], 6), ([-1, 0], -1), ([1000, 2], 1000)])
def test_labels_out_of_range(labels, bad):
    _raises(rf"y: expected labels in \[0, 5\) or the null class 5 \(unconditional\), got {bad}",
            y=torch.tensor(labels))


def test_null_class_label_only_with_a_null_class():
    sample(ToyModel(), torch.randn(2, 3, 5, 5), torch.tensor([5, 0]), steps=2)  # null class: unconditional entry
    model = ToyModel()
    model.null_class = None  # trained without class dropout: label 5 does not exist
    _raises(r"y: expected labels in \[0, 5\), got 5", model=model, y=torch.tensor([5, 0]))


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_cfg_scale_not_finite(scale):
    _raises("cfg_scale: expected a finite number", cfg_scale=scale)


@pytest.mark.parametrize("schedule", [[4, 3, 2], (4, 2), "ase-demo"])
def test_schedule_as_list_or_string(schedule):
    _raises_type(r"schedule: expected an ExitSchedule .*ExitSchedule.piecewise\(\[...\]\) or "
                 r"ExitSchedule.preset\(name\)", schedule=schedule)


def test_schedule_without_plan():
    _raises_type(r"schedule: expected an ExitSchedule \(with .plan\(timesteps\)\) or None, got dict",
                 schedule={"depths": [4]})


def test_empty_batch():
    _raises(r"noise: expected a batch of at least one sample, got shape \(0, 3, 5, 5\)",
            noise=torch.randn(0, 3, 5, 5), y=torch.tensor([], dtype=torch.int64))


def test_generator_wrong_type():
    _raises_type(r"generator: expected a torch.Generator or None, got int 0", generator=0, sampler="ddpm")
    _raises_type("generator: expected a torch.Generator", generator=torch.Generator().manual_seed(0).get_state())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA generator: only CPU ones exist here")
def test_generator_on_another_device():
    _raises("generator: expected a CPU generator or one on the noise's device cpu, got one on cuda",
            generator=torch.Generator(device="cuda"), sampler="ddpm")


@pytest.mark.parametrize("value,exc,match", [
    (0, ValueError, r"cfg_channels: expected None or an int in \[1, 3\] \(the noise's channels\), got 0"),
    (4, ValueError, r"cfg_channels: expected None or an int in \[1, 3\].*got 4"),
    (2.5, TypeError, r"cfg_channels: expected None or an int in \[1, 3\], got 2.5"),
    (True, TypeError, "cfg_channels: expected None or an int"),
])
def test_bad_cfg_channels(value, exc, match):
    model = ToyModel()
    with pytest.raises(exc, match=match):
        sample(model, torch.randn(2, 3, 5, 5), torch.tensor([0, 1]), cfg_scale=2.0, cfg_channels=value)
    assert model.calls == []


def test_eta_not_finite():
    _raises("eta: expected >= 0 and finite, got inf", eta=float("inf"))


# ---- dtypes: the model gets x in its parameters' dtype ------------------------------------------------------------

class DtypeSpy(ToyModel):
    def forward(self, x, t, y=None, depth=None, exit_cache=None):
        self.seen = getattr(self, "seen", set()) | {x.dtype}
        return super().forward(x, t, y, depth, exit_cache)


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver++", "ddpm"])
def test_float64_noise_float32_model(sampler):
    """Cast, not raised: float32 model calls, a float64 solver state, float64 result (it failed mid-run before)."""
    noise, y = torch.randn(2, 3, 5, 5), torch.tensor([0, 1])
    model = DtypeSpy(learn_sigma=True)
    out = sample(model, noise.double(), y, sampler=sampler, steps=5, generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float64 and model.seen == {torch.float32} and torch.isfinite(out).all()
    if sampler != "ddpm":  # DDPM's fresh noise is drawn in the state's dtype: float64 draws are other numbers
        assert relerr(out, sample(model, noise, y, sampler=sampler, steps=5)) < 1e-5


def test_float32_noise_lower_precision_model():
    model = DtypeSpy().to(torch.bfloat16)
    out = sample(model, torch.randn(2, 3, 5, 5), torch.tensor([0, 1]), steps=3)
    assert out.dtype == torch.float32 and model.seen == {torch.bfloat16}
