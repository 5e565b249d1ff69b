"""Bad inputs tried against eekernels' public entry points, counted by category.

    python benchmarks/bad_inputs.py                  # the table (markdown) on stdout
    python benchmarks/bad_inputs.py --json out.json  # and every case with its outcome

Each case is one bad input to one public entry point: the op wrappers and ``torch.ops.eekernels.*`` (torch
reference and, under ``TRITON_INTERPRET=1``, the Triton path), ``ExitSchedule``, ``eekernels.sample``, the
checkpoint loaders, ``eekernels.accelerate`` and the CLI. Every case expects a refusal, and its outcome is one of:

- **named**: a ``ValueError`` / ``TypeError`` (a CLI: exit code 2 with one error line) whose message names
  the argument;
- **schema**: ``torch.ops.eekernels.*`` given a value of the wrong Python type (a list for a tensor, a string
  for a float): torch's dispatcher refuses it with a ``RuntimeError`` that names the argument and the expected
  type, before eekernels' code runs;
- **unnamed**: such an error whose message does not name the argument;
- **crash**: any other exception, or a CLI traceback;
- **silent**: no error at all (a wrong result or a wrong shape is returned, or the input is accepted);
- **data lost**: a case that must leave files alone changed or removed them.

It runs on the CPU in about a minute; the table in benchmarks/RESULTS.md ("bad inputs tried") is its output.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import pickle
import sys
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton path runs on CPU tensors through the interpreter

import torch  # noqa: E402

import eekernels  # noqa: E402
from eekernels import ops  # noqa: E402

OUTCOMES = ("named", "schema", "unnamed", "crash", "silent", "data lost")
CASES: list[tuple[str, str, object, tuple[str, ...]]] = []  # (category, description, thunk, names)


def case(category: str, description: str, names: str | tuple[str, ...]):
    """Register ``fn`` as one bad input; ``names``: what a good error message mentions (any of them)."""
    names = (names,) if isinstance(names, str) else names

    def register(fn):
        CASES.append((category, description, fn, names))
        return fn

    return register


def classify(fn, names) -> tuple[str, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fn()
    except (ValueError, TypeError) as e:
        msg = str(e)
        return ("named" if any(n.lower() in msg.lower() for n in names) else "unnamed"), msg.splitlines()[0][:200]
    except RuntimeError as e:
        msg = str(e)
        if "Expected a value of type" in msg and any(f"argument '{n}'" in msg for n in names):
            return "schema", msg.splitlines()[0][:200]
        return "crash", f"RuntimeError: {msg.splitlines()[0][:200] if msg else ''}"
    except Exception as e:  # noqa: BLE001 - everything else is what this script exists to find
        return "crash", f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    if isinstance(result, tuple) and result and result[0] in OUTCOMES:  # a case that judged itself
        return result
    return "silent", f"returned {type(result).__name__}"


# --------------------------------------------------------------------------------------------------
# Ops: every tensor argument of every op with a wrong rank, too few elements, an integer dtype, a list, and a
# meta-device tensor; every eps NaN / Inf / negative / bool; bad activations and group counts. Each through the
# public wrapper and through torch.ops.eekernels, on the torch and the Triton backends.
# --------------------------------------------------------------------------------------------------
def _valid_op_args(name: str) -> dict:
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    B, N, D, C, H, W, M = 2, 5, 24, 8, 3, 5, 7
    return {
        "modulated_layer_norm": dict(x=r(B, N, D), shift=r(B, D), scale=r(B, D), eps=1e-6),
        "gated_residual_norm": dict(x=r(B, N, D), y=r(B, N, D), gate=r(B, D), shift=r(B, D), scale=r(B, D),
                                    weight=r(D), bias=r(D), eps=1e-6),
        "layer_norm": dict(x=r(B, N, D), weight=r(D), bias=r(D), eps=1e-6),
        "linear_act": dict(x=r(B, N, D), weight=r(M, D), bias=r(M), activation="gelu_tanh"),
        "group_norm_act": dict(x=r(B, C, H, W), num_groups=4, weight=r(C), bias=r(C), scale=r(B, C),
                               shift=r(B, C), activation="silu", eps=1e-5),
        "rms_norm": dict(x=r(B, N, D), weight=r(D), eps=1e-6),
        "cfg_step": dict(x=r(B, C, H, W), out=r(2 * B, 2 * C, H, W), scale=r(1)[0], a=r(1)[0], b=r(1)[0],
                         cfg_channels=None),
        "qk_norm_rope": dict(q=r(B, N, 3, D), k=r(B, N, 3, D), q_weight=r(D), k_weight=r(D), cos=r(N, D),
                             sin=r(N, D), eps=1e-6),
    }[name]


# Mutations that give a valid input for that op and argument, so they are not bad inputs: x of layer_norm and
# linear_act and rms_norm take any leading dims (..., D); group_norm_act takes any W.
VALID_MUTATIONS = {("layer_norm", "x", "one more dim"), ("linear_act", "x", "one more dim"),
                   ("group_norm_act", "x", "last dim one short"), ("rms_norm", "x", "one more dim")}


def _tensor_mutations(t: torch.Tensor):
    yield "one more dim", t.unsqueeze(0)
    if t.dim() > 1:
        yield "one dim fewer", t.reshape(-1)
    if t.dim() > 0:  # cfg_step's 0-d scale, a, b have no last dim
        yield "last dim one short", t[..., :-1]
    yield "int32 dtype", t.to(torch.int32)
    yield "a list", t.tolist()
    yield "on the meta device", t.to("meta")


def _scalar_mutations(key: str):
    if key == "eps":
        return [("NaN", math.nan), ("Inf", math.inf), ("negative", -1e-6), ("a bool", True), ("a string", "1e-6"),
                ("zero", 0), ("False", False)]
    if key == "activation":
        return [("unknown name", "relu6"), ("an int", 3)]
    if key == "num_groups":
        return [("zero", 0), ("not dividing C", 3), ("a bool", True), ("a float", 4.0), ("False", False),
                ("negative", -4), ("more than C", 16)]
    if key == "cfg_channels":  # C = 8 channels
        return [("a bool", True), ("False", False), ("zero", 0), ("negative", -1), ("more than C", 99),
                ("C + 1", 9), ("a float", 2.0)]
    if key == "x_scale":  # fp8_linear's calibrated scale
        return [("NaN", math.nan), ("Inf", math.inf), ("negative", -1.0), ("zero", 0.0), ("a bool", True),
                ("a string", "0.01"), ("a (2,) tensor", torch.full((2,), 0.01)), ("a NaN tensor", torch.tensor(math.nan))]
    return []


def _call_wrapper(name, kw, key):
    return getattr(ops, name)(**kw)


def _call_wrapper_grad(name, kw, key):
    """The wrapper's autograd path (through torch.ops.eekernels): another tensor argument requires grad (x last)."""
    grad = next(k for k in [*kw, "x"] if k != key and (k == "x" or isinstance(kw[k], torch.Tensor)))
    return getattr(ops, name)(**{**kw, grad: kw[grad].detach().clone().requires_grad_()})


def _call_registered(name, kw, key):
    op = getattr(torch.ops.eekernels, name)
    schema = op.default._schema
    return op(*[kw.get(a.name) for a in schema.arguments])


def _op_cases():
    for name in ops.__all__:
        valid = _valid_op_args(name)
        for key, value in valid.items():
            muts = list(_tensor_mutations(value)) if isinstance(value, torch.Tensor) else _scalar_mutations(key)
            for what, bad in muts:
                if (name, key, what) in VALID_MUTATIONS:
                    continue
                for entry, call in (("ops", _call_wrapper), ("torch.ops", _call_registered),
                                    ("ops, autograd path", _call_wrapper_grad)):
                    for backend in ("torch", "triton"):
                        kw = {**valid, key: bad}

                        def thunk(call=call, name=name, kw=kw, backend=backend, key=key):
                            with eekernels.backend(backend):
                                return call(name, kw, key)

                        case(f"ops ({entry})", f"{name}({key}: {what}) [{backend}]", key)(thunk)


_op_cases()


def _fp8_cases():
    """fp8_linear (not a registered op: its one entry point is the Python function)."""
    from eekernels.ops.fp8_linear import fp8_linear, quantize_fp8

    g = torch.Generator().manual_seed(0)
    wq, ws = quantize_fp8(torch.randn(16, 32, generator=g))  # per tensor: x_scale is allowed
    valid = dict(x=torch.randn(4, 32, generator=g), weight_fp8=wq, weight_scale=ws,
                 bias=torch.randn(16, generator=g), activation="gelu", x_scale=0.01)
    for key, value in valid.items():
        muts = list(_tensor_mutations(value)) if isinstance(value, torch.Tensor) else _scalar_mutations(key)
        for what, bad in muts:
            if (key, what) in {("x", "one more dim"), ("weight_scale", "one more dim")}:  # x (..., K); scale (1,)
                continue
            case("ops (fp8_linear)", f"fp8_linear({key}: {what})", key)(
                lambda kw={**valid, key: bad}: fp8_linear(**kw))


_fp8_cases()


# --------------------------------------------------------------------------------------------------
# Exit schedules
# --------------------------------------------------------------------------------------------------
def _schedule_cases():
    S = eekernels.ExitSchedule
    bad = [
        ("piecewise([])", lambda: S.piecewise([]), "depths"),
        ("piecewise([-1, 4])", lambda: S.piecewise([-1, 4]), "depth"),
        ("piecewise([2.5])", lambda: S.piecewise([2.5]), "depth"),
        ("piecewise('12,12')", lambda: S.piecewise("12,12"), "depth"),
        ("piecewise(total_depth below the table)", lambda: S.piecewise([8, 6], total_depth=4), "depth"),
        ("linear(min > max)", lambda: S.linear(8, 4), "depth"),
        ("periodic(k=0)", lambda: S.periodic(0, 4, 8), "k"),
        ("periodic(depth > total)", lambda: S.periodic(2, 9, 8), "depth"),
        ("preset('nope')", lambda: S.preset("nope"), "preset"),
        ("from_fn returning -1", lambda: S.from_fn(lambda t: -1, total_depth=4), "depth"),
        ("rescaled(0)", lambda: S.preset("ase-dit-xl").rescaled(0), "depth"),
        ("depth(NaN t)", lambda: S.piecewise([4, 2]).depth(torch.tensor([float("nan")])), "t"),
        ("plan(Inf timesteps)", lambda: S.piecewise([4, 2]).plan(torch.tensor([float("inf"), 3.0])), "t"),
        ("num_timesteps=0", lambda: S.piecewise([4, 2], num_timesteps=0), "num_timesteps"),
        ("uncond of the wrong length", lambda: S([4, 4], 4, uncond=["run"]), "uncond"),
        ("uncond 'skip'", lambda: S([4, 4], 4, uncond=["run", "skip"]), "uncond"),
        ("uncond forecast below full depth", lambda: S([4, 2], 4, uncond=["run", "forecast"]), "uncond"),
        ("uncond drop below full depth on a cache call",
         lambda: S([4, 2], 4, uncond=["run", "drop"], policies=["drop", "cache"]), "uncond"),
    ]
    for what, fn, names in bad:
        case("schedules", what, names)(fn)


_schedule_cases()


# --------------------------------------------------------------------------------------------------
# eekernels.sample
# --------------------------------------------------------------------------------------------------
def _tiny_dit():
    from eekernels.models import DiT

    torch.manual_seed(0)
    return DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=4, num_heads=2, num_classes=10,
               learn_sigma=False).eval()


def _sample_cases():
    model = _tiny_dit()
    noise = torch.randn(2, 3, 8, 8)
    y = torch.tensor([1, 2])
    S = eekernels.ExitSchedule

    def run(**over):
        kw = dict(model=model, noise=noise, y=y, sampler="ddim", steps=2, cfg_scale=1.5)
        kw.update(over)
        return eekernels.sample(kw.pop("model"), kw.pop("noise"), kw.pop("y"), **kw)

    bad = [
        ("label = num_classes + 1", dict(y=torch.tensor([1, 11])), "y"),
        ("label -1", dict(y=torch.tensor([-1, 2])), "y"),
        ("float labels", dict(y=torch.tensor([1.0, 2.0])), "y"),
        ("labels of the wrong batch", dict(y=torch.tensor([1, 2, 3])), "y"),
        ("labels (B, 1)", dict(y=torch.tensor([[1], [2]])), "y"),
        ("cfg_scale NaN", dict(cfg_scale=math.nan), "cfg_scale"),
        ("cfg_scale Inf", dict(cfg_scale=math.inf), "cfg_scale"),
        ("cfg_scale a string", dict(cfg_scale="1.5"), "cfg_scale"),
        ("schedule as a list", dict(schedule=[4, 4, 2, 2]), "schedule"),
        ("schedule as a string", dict(schedule="ase-demo"), "schedule"),
        ("schedule deeper than the model", dict(schedule=S.piecewise([8, 6])), "schedule"),
        ("batch-0 noise", dict(noise=torch.randn(0, 3, 8, 8), y=torch.tensor([], dtype=torch.int64)), "noise"),
        ("integer noise", dict(noise=torch.ones(2, 3, 8, 8, dtype=torch.int64)), "noise"),
        ("noise with the wrong channels", dict(noise=torch.randn(2, 4, 8, 8)), "noise"),
        ("noise of the wrong size", dict(noise=torch.randn(2, 3, 6, 6)), "noise"),
        ("generator an int", dict(sampler="ddpm", generator=0), "generator"),
        ("generator a numpy RNG", dict(sampler="ddpm", generator=__import__("numpy").random.default_rng(0)),
         "generator"),
        ("steps 0", dict(steps=0), "steps"),
        ("steps 2.5", dict(steps=2.5), "steps"),
        ("steps True", dict(steps=True), "steps"),
        ("sampler 'foo'", dict(sampler="foo"), "sampler"),
        ("exit_policy 'skip'", dict(exit_policy="skip"), "exit_policy"),
        ("exit_policy cache without a schedule", dict(exit_policy="cache"), "exit_policy"),
        ("exit_policy cache on a schedule that never runs full depth",
         dict(exit_policy="cache", schedule=S.piecewise([2, 2])), "schedule"),
        ("timestep_spacing 'foo'", dict(timestep_spacing="foo"), "timestep_spacing"),
        ("eta NaN", dict(eta=math.nan), "eta"),
        ("an unknown solver option", dict(foo=1), "foo"),
        ("graphs=True on the CPU", dict(graphs=True), "graphs"),
        ("depth 0 under exit_policy drop (no block would run)", dict(schedule=S.periodic(2, 0, 4)), "schedule"),
        ("forecast_order 3", dict(exit_policy="forecast", schedule=S.periodic(2, 0, 4), forecast_order=3),
         "forecast_order"),
        ("forecast_target 'modules'", dict(exit_policy="forecast", schedule=S.periodic(2, 0, 4),
                                           forecast_target="modules"), "forecast_target"),
        ("forecast_target 'blocks' under exit_policy cache",
         dict(exit_policy="cache", schedule=S.periodic(2, 0, 4), forecast_target="blocks"), "forecast_target"),
        ("uncond forecast without CFG (cfg_scale 1)",
         dict(schedule=S([4, 4], 4, uncond=["forecast", "run"]), cfg_scale=1.0), "cfg_scale"),
        ("uncond forecast at the first call", dict(schedule=S([4, 4], 4, uncond=["run", "forecast"])), "schedule"),
        ("uncond drop without CFG (cfg_scale 1)", dict(schedule=S([4, 4], 4, uncond=["drop", "run"]), cfg_scale=1.0),
         "cfg_scale"),
        ("uncond forecast after dropped calls only", dict(schedule=S([4, 4], 4, uncond=["forecast", "drop"])),
         "schedule"),
        ("uncond drop below full depth under exit_policy cache",
         dict(exit_policy="cache", schedule=S([2, 4], 4, uncond=["drop", "run"])), "exit_policy"),
        ("forecast_order contradicting the plan's",
         dict(schedule=S([0, 4], 4, policies=["forecast"] * 2, forecast_order=2), forecast_order=1), "forecast_order"),
    ]
    for what, over, names in bad:
        case("sampling", what, names)(lambda over=over: run(**over))
    # rollout (training.trajectory): sample() with gradients takes the same arguments and refuses the same inputs,
    # plus what it cannot run (reuse policies, uncond plans) and a trajectory_loss target of the wrong shape
    from eekernels.training.trajectory import rollout, trajectory_loss

    def roll(**over):
        kw = dict(model=model, noise=noise, y=y, sampler="ddim", steps=2, cfg_scale=1.5)
        kw.update(over)
        return rollout(kw.pop("model"), kw.pop("noise"), kw.pop("y"), **kw)

    own = [("exit_policy cache on a schedule", dict(schedule=S([4, 2], 4, policies=["cache"] * 2)), "schedule"),
           ("an uncond forecast", dict(schedule=S([4, 4], 4, uncond=["run", "forecast"])), "schedule")]
    for what, over, names in [*bad, *own]:
        if {"exit_policy", "graphs", "forecast_order", "forecast_target"} & set(over):  # not rollout's arguments
            continue
        case("rollout (training)", what, names)(lambda over=over: roll(**over))
    case("rollout (training)", "trajectory_loss with a target of another shape", "target")(
        lambda: trajectory_loss(model, torch.zeros(1, 3, 8, 8), noise, y, sampler="ddim", steps=2))
    case("rollout (training)", "trajectory_loss with a list target", "target")(
        lambda: trajectory_loss(model, [0.0], noise, y, sampler="ddim", steps=2))
    case("rollout (training)", "trajectory_loss with list noise", "noise")(
        lambda: trajectory_loss(model, torch.zeros(2, 3, 8, 8), [[0.0]], y, sampler="ddim", steps=2))


_sample_cases()


def _sample_value_cases():
    """Kinds and values: a solver of the other prediction kind, NaN/Inf noise and captions, caption mask values
    other than 0/1, the flow solvers' sigma grid (a tiny FLUX: tokens, mask, pooled text, guidance)."""
    from eekernels.models import DiT, Flux, TextCondition

    dit, noise, y = _tiny_dit(), torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    torch.manual_seed(0)
    flux = Flux(latent_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=12, pooled_projection_dim=5, guidance_embeds=True, axes_dims_rope=(4, 6, 6)).eval()
    tok, mask, pooled = torch.randn(2, 3, 12), torch.ones(2, 3, dtype=torch.int64), torch.randn(2, 5)
    g = torch.full((2,), 3.5)

    def put(t, value):
        t = t.clone()
        t.view(-1)[-1] = value
        return t

    def run_flux(noise=None, tokens=tok, m=mask, p=pooled, guidance=g, negative=None, **kw):
        cond = TextCondition(tokens, m, p, {"guidance": guidance})
        return eekernels.sample(flux, torch.randn(2, 4, 4, 4) if noise is None else noise, cond, sampler="flow_euler",
                                steps=2, negative=negative, **kw)

    bad = [
        ("flow_euler on an epsilon DiT", lambda: eekernels.sample(dit, noise, y, sampler="flow_euler", steps=2),
         "sampler"),
        ("DiT prediction_type 'v_prediction'",
         lambda: DiT(input_size=8, depth=2, hidden_size=32, num_heads=2, prediction_type="v_prediction"),
         "prediction_type"),
        ("DiT prediction_type 'flow' with learned sigma",
         lambda: DiT(input_size=8, depth=2, hidden_size=32, num_heads=2, prediction_type="flow"), "prediction_type"),
        ("NaN noise", lambda: eekernels.sample(dit, put(noise, math.nan), y, steps=2), "noise"),
        ("Inf noise (text model)", lambda: run_flux(noise=put(torch.randn(2, 4, 4, 4), math.inf)), "noise"),
        ("NaN caption tokens", lambda: run_flux(tokens=put(tok, math.nan)), "y.tokens"),
        ("Inf pooled text", lambda: run_flux(p=put(pooled, math.inf)), "y.pooled"),
        ("NaN guidance", lambda: run_flux(guidance=put(g, math.nan)), "guidance"),
        ("caption mask value 2", lambda: run_flux(m=put(mask, 2)), "y.mask"),
        ("caption mask value 0.5", lambda: run_flux(m=put(mask.float(), 0.5)), "y.mask"),
        ("NaN negative-prompt tokens",
         lambda: run_flux(cfg_scale=2.0, negative=TextCondition(put(tok, math.nan), mask, pooled, {"guidance": g})),
         "negative.tokens"),
        ("sigma_grid 'karras'", lambda: run_flux(sigma_grid="karras"), "sigma_grid"),
        ("sigmas and sigma_grid='flux'", lambda: run_flux(sigma_grid="flux", sigmas=[1.0, 0.5]), "sigma_grid"),
    ]
    for what, fn, names in bad:
        case("sampling", what, names)(fn)


_sample_value_cases()


# --------------------------------------------------------------------------------------------------
# Checkpoint loaders and accelerate()
# --------------------------------------------------------------------------------------------------
class _Marker:
    """A pickle whose loading would create ``path``: a loader that runs it has executed code from a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _loader_cases(tmp: Path):
    from eekernels.models import DiT
    from eekernels.models.pretrained import load_model_file

    marker = tmp / "EXECUTED"
    evil = tmp / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "payload": _Marker(marker)}, evil)
    evil_legacy = tmp / "evil_legacy.pt"
    torch.save({"payload": _Marker(marker)}, evil_legacy, _use_new_zipfile_serialization=False)
    evil_pickle = tmp / "evil.pkl"
    evil_pickle.write_bytes(pickle.dumps({"payload": _Marker(marker)}))
    text = tmp / "notes.txt"
    text.write_text("not a checkpoint")
    empty = tmp / "empty.pt"
    empty.write_bytes(b"")
    sd = _tiny_dit().state_dict()
    truncated = tmp / "truncated.pt"
    torch.save(sd, truncated)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    wrong = tmp / "wrong_keys.pt"
    torch.save({**sd, "blocks.0.extra.weight": torch.ones(3)}, wrong)

    def no_exec(fn):
        def thunk():
            try:
                return fn()
            finally:
                if marker.exists():
                    marker.unlink()
                    raise RuntimeError("code from the file ran")  # counted as a crash, whatever fn did
        return thunk

    for label, path in (("zip pickle", evil), ("legacy pickle", evil_legacy), ("plain pickle", evil_pickle)):
        case("checkpoints", f"load_model_file({label} that runs code)", ("refused", str(path), "global"))(
            no_exec(lambda p=path: load_model_file(p)))
        case("checkpoints", f"DiT.from_checkpoint({label} that runs code)", ("refused", str(path), "global"))(
            no_exec(lambda p=path: DiT.from_checkpoint(p)))
    for label, path in (("a text file", text), ("an empty file", empty), ("a truncated file", truncated),
                        ("a missing file", tmp / "missing.pt")):
        case("checkpoints", f"load_model_file({label})", str(path))(lambda p=path: load_model_file(p))
        case("checkpoints", f"DiT.from_checkpoint({label})", str(path))(lambda p=path: DiT.from_checkpoint(p))
    case("checkpoints", "DiT.from_checkpoint(an unexpected key)", "blocks.0.extra.weight")(
        lambda: DiT.from_checkpoint(wrong, num_heads=2))
    case("checkpoints", "DiT.from_checkpoint(a list)", "state dict")(lambda: DiT.from_checkpoint([1, 2]))

    def nan_weights():
        bad = dict(sd)
        key = next(k for k in bad if k.endswith("weight"))
        bad[key] = bad[key].clone().fill_(float("nan"))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            DiT.from_checkpoint(bad, num_heads=2)
        if any(key in str(x.message) for x in w):
            return "named", "warned, naming the tensor"
        return "silent", "no warning"

    case("checkpoints", "NaN weights (a warning naming the tensor)", "nan")(nan_weights)
    case("accelerate", "accelerate(an nn.Linear)", ("accelerate", "Linear"))(
        lambda: eekernels.accelerate(torch.nn.Linear(2, 2), native=True))
    case("accelerate", "accelerate(a string)", ("accelerate", "str"))(lambda: eekernels.accelerate("DiT-XL/2"))
    case("accelerate", "accelerate(schedule as a list)", "schedule")(
        lambda: eekernels.accelerate(_tiny_dit(), schedule=[4, 2], native=True))

    def denoiser_of_another_family():
        import diffusers

        pipe = diffusers.DDIMPipeline(unet=None, scheduler=diffusers.DDIMScheduler())
        eekernels.accelerate(pipe)  # in place, no denoiser yet: one set later is accelerated when a run starts
        pipe.unet = diffusers.DiTTransformer2DModel(num_attention_heads=1, attention_head_dim=8, in_channels=4,
                                                    num_layers=1, sample_size=4, patch_size=2)
        pipe.set_progress_bar_config(disable=True)
        return pipe(num_inference_steps=1, output_type="np")

    case("accelerate", "accelerate(pipe built with unet=None), then a DiT as its unet", ("unet", "DiT"))(
        denoiser_of_another_family)

    # The native tier refuses by name what its fused model cannot do (the in-place tier can).
    def sd3_pipeline(transformer=True):
        import diffusers

        tr = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1,
                                             attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                             caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
                                             pos_embed_max_size=16) if transformer else None
        return diffusers.StableDiffusion3Pipeline(
            transformer=tr, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
            tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)

    case("accelerate", "accelerate(a pipeline built with transformer=None, native=True)", "transformer=None")(
        lambda: eekernels.accelerate(sd3_pipeline(transformer=False), native=True))
    case("accelerate", "native stand-in: set_attn_processor", "set_attn_processor")(
        lambda: eekernels.accelerate(sd3_pipeline(), native=True).transformer.set_attn_processor(None))
    case("accelerate", "native pipeline: load_lora_weights", "load_lora_weights")(
        lambda: eekernels.accelerate(sd3_pipeline(), native=True).load_lora_weights({}))


def _patch_cases():
    """eekernels.patches (fused ops in place) and accelerate's `kernels` switch."""
    from eekernels import patches

    case("patches", "accelerate(kernels='yes')", "kernels")(lambda: eekernels.accelerate(_tiny_dit(), kernels="yes"))
    case("patches", "patches.patch(a string)", "model")(lambda: patches.patch("transformer"))
    case("patches", "patches.patch(report=1)", "report")(lambda: patches.patch(torch.nn.Linear(2, 2), report=1))
    case("patches", "patches.unpatch(an unpatched module)", "unpatched")(
        lambda: patches.unpatch(torch.nn.Linear(2, 2)))


_patch_cases()


def _video_family_cases():
    """The family table's fields for video families (issue 22): two output streams, a step's t."""
    from eekernels.families import Family, PrefixExit

    case("families", "PrefixExit(out_streams=3)", "out_streams")(
        lambda: PrefixExit(blocks=("transformer_blocks",), out_streams=3))
    case("families", "Family(step_t=1000)", "step_t")(
        lambda: Family(name="bad", classes=("diffusers:CosmosTransformer3DModel",),
                       exit=PrefixExit(blocks=("transformer_blocks",)), step_t=1000))


_video_family_cases()


def _family_field_cases():
    """The family table's per-family timestep and routing fields (issue 22), and ``inplace.plan``."""
    from eekernels import inplace
    from eekernels.families import Family, PrefixExit, scaled_step_t

    rule = PrefixExit(blocks=("blocks",))
    case("families", "Family(route=3)", "route")(lambda: Family(name="x", exit=rule, route=3))
    case("families", "Family(timestep_map='1 - x')", "timestep_map")(
        lambda: Family(name="x", exit=rule, timestep_map="1 - x"))
    case("families", "scaled_step_t(0)", "scale")(lambda: scaled_step_t(0))
    case("families", "inplace.plan(a module, not an accelerated pipeline)", "pipe")(
        lambda: inplace.plan(torch.nn.Linear(2, 2), 3))


_family_field_cases()


def _family_cases():
    """Issue 22's families: what one family's structure cannot serve is refused by name before any block runs."""

    def qwenimage21_cache_policy_with_kv_cache():
        import diffusers
        from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

        torch.manual_seed(0)
        model = diffusers.QwenImage21Transformer2DModel(patch_size=1, in_channels=8, out_channels=8, num_layers=2,
                                                        attention_head_dim=8, num_attention_heads=2,
                                                        context_in_dim=16, mlp_ratio=2, axes_dims_rope=(2, 2, 4))
        eekernels.accelerate(model, schedule=eekernels.ExitSchedule.periodic(2, 1, 2), exit_policy="cache")
        img_mask = torch.tensor([[False] * 6 + [True] * 4])
        with torch.no_grad():
            model(hidden_states=torch.randn(1, 16, 8), encoder_hidden_states=torch.randn(1, 6, 16),
                  timestep=torch.tensor([0.5]), img_shapes=[[(1, 4, 4)]], img_mask=img_mask,
                  encoder_hidden_states_mask=torch.ones(1, 6, dtype=torch.bool), kv_cache=QwenImage21KVCache(2),
                  kv_cache_mode="extract", return_dict=False)

    case("families", "Qwen-Image 2.1 prefix KV cache with exit_policy='cache'", "exit_policy")(
        qwenimage21_cache_policy_with_kv_cache)


_family_cases()


# --------------------------------------------------------------------------------------------------
# The CLI: exit code 2 with one error line that names the option, no traceback
# --------------------------------------------------------------------------------------------------
def _cli(argv, names):
    from eekernels.cli import main

    def thunk():
        err = io.StringIO()
        code = None
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(argv)
        except SystemExit as e:
            code = e.code
        except (ValueError, TypeError) as e:
            return "crash", f"traceback: {type(e).__name__}: {e}"
        text = err.getvalue().strip()
        if code in (0, None):
            return "silent", "exit code 0"
        if code != 2 or "Traceback" in text:
            return "crash", f"exit code {code}: {text.splitlines()[-1][:200] if text else ''}"
        last = text.splitlines()[-1] if text else ""
        return ("named" if any(n in last for n in names) else "unnamed"), last[:200]

    return thunk


def _flow_file(tmp: Path) -> str:
    """A tiny flow-matching (velocity) DiT in the shipped format."""
    from eekernels.models import DiT
    from eekernels.models.pretrained import save_model_file
    from eekernels.training import model_kwargs

    m = DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=16, depth=1, num_heads=2, num_classes=10,
            learn_sigma=False, prediction_type="flow")
    save_model_file(m, tmp / "flow.pt", "dit", model_kwargs(m))
    return str(tmp / "flow.pt")


def _cli_cases(tmp: Path):
    out = str(tmp / "cli-out")
    afile = str(tmp / "a-file")
    Path(afile).write_text("a file where a folder is expected")
    nan_file = str(tmp / "nan-weights.pt")
    from eekernels.models import DiT
    from eekernels.models.pretrained import save_model_file
    from eekernels.training import model_kwargs

    model = DiT(input_size=8, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    with torch.no_grad():
        model.final_layer.linear.weight.fill_(float("nan"))
    save_model_file(model, nan_file, "dit", model_kwargs(model))
    bad = [
        (["sample", "--schedule", "periodic:3", "--out", out], "--schedule"),
        (["sample", "--schedule", "fast", "--out", out], "--schedule"),
        (["sample", "--schedule", "12,x", "--out", out], "--schedule"),
        (["sample", "--exit-policy", "cache", "--out", out], ("--exit-policy", "--schedule")),
        (["sample", "--model", "glyph-judge", "--out", out], "--model"),
        (["sample", "--model", "nope", "--out", out], "--model"),
        (["sample", "--steps", "0", "--out", out], "--steps"),
        (["sample", "--num-images", "0", "--out", out], "--num-images"),
        (["sample", "--sampler", "foo", "--out", out], "--sampler"),
        (["sample", "--cfg-scale", "nan", "--out", out], "--cfg-scale"),
        (["sample", "--checkpoint", str(tmp / "missing.pt"), "--out", out], "--checkpoint"),
        (["sample", "--device", "tpu", "--out", out], "--device"),
        (["finetune", "--checkpoint", "glyph-dit", "--steps", "0", "--out", out], "--steps"),
        (["finetune", "--checkpoint", "glyph-dit", "--steps", "2", "--log-every", "0", "--out", out], "--log-every"),
        (["finetune", "--checkpoint", "glyph-dit", "--steps", "2", "--lr", "-1", "--out", out], "--lr"),
        (["finetune", "--checkpoint", "glyph-dit", "--steps", "2", "--data", "imagenet", "--out", out], "--data"),
        (["finetune", "--checkpoint", "glyph-judge", "--steps", "2", "--out", out], "--checkpoint"),
        (["bench", "--batch", "0"], "--batch"),
        (["nope"], "nope"),
        # options that used to fail only after the work (issue 20): refused first now
        (["sample", "--vae", str(tmp / "no-such-dir"), "--out", out], "--vae"),
        (["sample", "--out", afile], "--out"),
        (["sample", "--num-images", "5000000", "--out", out], "--num-images"),
        (["sample", "--seed", str(2**64), "--out", out], "--seed"),
        (["sample", "--num-heads", "0", "--out", out], "--num-heads"),
        (["sample", "--cfg-channels", "4", "--out", out], "--cfg-channels"),
        (["sample", "--checkpoint", nan_file, "--out", out], "--checkpoint"),
        (["bench", "--model", "glyph-judge"], "--model"),
        (["bench", "--sampler", "plms"], "--sampler"),
        (["bench", "--json", afile + "/b.json"], "--json"),
        (["finetune", "--checkpoint", "glyph-dit", "--steps", "2", "--out", afile], "--out"),
        (["finetune", "--checkpoint", "glyph-dit", "--steps", "2", "--device", "tpu", "--out", out], "--device"),
        (["sample", "--checkpoint", _flow_file(tmp), "--sampler", "dpmsolver++", "--out", out], "--sampler"),
    ]
    for argv, names in bad:
        case("CLI", "eekernels " + " ".join("OUT" if a == out else a.replace(str(tmp), "TMP") for a in argv),
             (names,) if isinstance(names, str) else names)(_cli(argv, (names,) if isinstance(names, str) else names))


# --------------------------------------------------------------------------------------------------
# Data that must not be lost
# --------------------------------------------------------------------------------------------------
def _data_cases(tmp: Path):
    def finetune_into_existing_run():
        run_dir = tmp / "old-run"
        run_dir.mkdir(exist_ok=True)
        files = {"checkpoint.pt": b"old checkpoint", "train_log.jsonl": b'{"step": 1}\n'}
        for k, v in files.items():
            (run_dir / k).write_bytes(v)
        outcome = _cli(["finetune", "--checkpoint", "glyph-dit", "--steps", "1", "--batch-size", "2",
                        "--out", str(run_dir), "--no-progress"], ("--out", "--resume", "--overwrite"))()
        if any((run_dir / k).read_bytes() != v for k, v in files.items() if (run_dir / k).exists()) or not all(
                (run_dir / k).exists() for k in files):
            return "data lost", "the earlier run's files were replaced"
        return outcome

    case("data", "finetune --out into a folder holding a run", ("--out",))(finetune_into_existing_run)


# --------------------------------------------------------------------------------------------------
# PixArt-Σ's self-attention options (qk_norm, kv_compress_config): every one not run as written is refused by name
# --------------------------------------------------------------------------------------------------
def _pixart_sigma_cases():
    from eekernels.models import TextCondition
    from eekernels.models.pixart import PixArt

    tiny = dict(sample_size=8, hidden_size=24, depth=2, num_heads=3, caption_channels=8)

    def kv(sampling, scale, layers):
        return dict(sampling=sampling, scale_factor=scale, kv_compress_layer=layers)

    bad = [
        ("kv_compress_config sampling 'bilinear' (not PixArt-sigma's)", dict(kv_compress_config=kv("bilinear", 2, [0])),
         "sampling"),
        ("kv_compress_config scale_factor 1.5", dict(kv_compress_config=kv("uniform", 1.5, [0])), "scale_factor"),
        ("kv_compress_config layer 2 of 2 blocks", dict(kv_compress_config=kv("uniform", 2, [2])), "kv_compress_layer"),
        ("kv_compress_config sampling None with scale 2", dict(kv_compress_config=kv(None, 2, [0])), "sampling"),
        ("kv_compress_config with an unknown key", dict(kv_compress_config={**kv("ave", 2, [0]), "stride": 2}),
         "kv_compress_config"),
        ("qk_norm 'layer_norm'", dict(qk_norm="layer_norm"), "qk_norm"),
    ]
    for what, over, names in bad:
        case("PixArt-Σ options", f"PixArt({what})", names)(lambda over=over: PixArt(**tiny, **over))
    torch.manual_seed(0)
    conv = PixArt(**tiny, qk_norm=True, kv_compress_config=kv("conv", 2, [1]))
    state = conv.state_dict_in("original")
    uniform = PixArt(**tiny, kv_compress_config=kv("uniform", 2, [0]))
    loads = [
        ("qk_norm=False on a QK-norm checkpoint", dict(qk_norm=False), "qk_norm"),
        ("kv_compress_config 'uniform' on a 'conv' checkpoint", dict(kv_compress_config=kv("uniform", 2, [1])),
         "kv_compress_config"),
        ("config with kv_compress_config but no kv_compress", dict(config={"kv_compress_config": kv("conv", 2, [1])}),
         "kv_compress"),
        ("config a number", dict(config=3), "config"),
    ]
    for what, over, names in loads:
        case("PixArt-Σ options", f"PixArt.from_checkpoint({what})", names)(
            lambda over=over: PixArt.from_checkpoint(state, num_heads=3, **over))

    def config_file_that_runs_code():
        with tempfile.TemporaryDirectory() as d:
            marker, path = Path(d) / "RAN", Path(d) / "config.py"
            path.write_text(f"kv_compress = __import__('pathlib').Path({str(marker)!r}).touch() or True\n")
            try:
                PixArt.from_checkpoint(state, num_heads=3, config=path)
            finally:
                if marker.exists():
                    raise RuntimeError("code from the config file ran")  # counted as a crash

    case("PixArt-Σ options", "PixArt.from_checkpoint(config file whose kv_compress runs code)", "kv_compress")(
        config_file_that_runs_code)
    case("PixArt-Σ options", "PixArt.from_diffusers(kv_compress_config=...) (diffusers has none)",
         "kv_compress_config")(lambda: PixArt.from_diffusers({}, kv_compress_config=kv("uniform", 2, [0])))
    case("PixArt-Σ options", "state_dict_in('diffusers') of a KV-compressed model", "kv_compress_config")(
        lambda: uniform.state_dict_in("diffusers"))
    case("PixArt-Σ options", "state_dict_in('diffusers') of a QK-norm model", "qk_norm")(
        lambda: conv.state_dict_in("diffusers"))
    case("PixArt-Σ options", "'uniform' by 2 on a 3 x 4 patch grid (PixArt-sigma fails)", "`x`")(
        lambda: uniform(torch.randn(1, 4, 6, 8), torch.tensor([10.0]), TextCondition(torch.randn(1, 3, 8))))


_pixart_sigma_cases()


# --------------------------------------------------------------------------------------------------
# Schedule files (ExitSchedule.load, --schedule calibrated:FILE) and `eekernels calibrate`'s options that would be
# ignored or fail after the work
# --------------------------------------------------------------------------------------------------
def _schedule_file_cases(tmp: Path):
    good = {"format": "eekernels.ExitSchedule", "version": 1, "table": [4, 3, 2], "total_depth": 4,
            "num_timesteps": 1000, "name": None}
    report = {"exit_policy": "drop", "sampler": "ddim", "steps": 2, "cfg_scale": 1.0, "budget": 0.8, "num_blocks": 4,
              "candidates": [2, 4], "call_timesteps": [500.0, 1.0], "weights": [0.1, 0.5], "plan": [2, 4],
              "proxy": 0.1, "block_flop_fraction": 0.75, "measure": "calls", "num_samples": 2, "model_calls": 4,
              "block_evaluations": 3.0, "seconds": 0.1, "trajectory_seconds": 0.05}
    bad = [
        ("a 400,000-entry table", dict(good, table=[4] * 400_000), "table"),
        ("no total_depth", {k: v for k, v in good.items() if k != "total_depth"}, "total_depth"),
        ("no version", {k: v for k, v in good.items() if k != "version"}, "version"),
        ("an unknown key", dict(good, tables=[4]), "tables"),
        ("a calibration report without its plan", dict(good, calibration={k: v for k, v in report.items()
                                                                          if k != "plan"}), "calibration.plan"),
        ("a calibration plan of the wrong length", dict(good, calibration=dict(report, plan=[2, 4, 4])),
         "calibration.plan"),
        ("a calibration plan outside its candidates", dict(good, calibration=dict(report, plan=[3, 4])),
         "calibration.plan"),
        ("a calibration report for another depth", dict(good, calibration=dict(report, num_blocks=8)),
         "calibration.num_blocks"),
        ("JSON nested 100,000 deep", "[" * 100_000 + "]" * 100_000, "path"),
        ("a joint plan's unknown policy", dict(good, policies=["drop", "reuse", "cache"]), "policies"),
        ("a joint plan of 0 steps", dict(good, steps=0), "steps"),
    ]
    for i, (what, doc, names) in enumerate(bad):
        path = tmp / f"schedule_{i}.json"
        path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
        case("schedule files", f"ExitSchedule.load({what})", names)(lambda p=path: eekernels.ExitSchedule.load(p))
    big = tmp / "schedule_big.json"
    with open(big, "wb") as f:  # over MAX_FILE_BYTES: refused before it is read
        f.write(b'{"format": "eekernels.ExitSchedule", "table": [' + b"4, " * (3 * 2**20) + b'4]}')
    case("schedule files", "ExitSchedule.load(a 9 MB file)", "path")(lambda: eekernels.ExitSchedule.load(big))


def _calibrate_cli_cases(tmp: Path):
    from eekernels.models.condition import TextCondition, save_prompt_embeds
    from eekernels.models.pretrained import pretrained_path

    out = str(tmp / "calibrated.json")
    prompts = tmp / "prompts.safetensors"
    save_prompt_embeds(prompts, TextCondition(torch.randn(2, 3, 8)))
    (tmp / "a_file").write_text("")
    ckpt = str(pretrained_path("glyph-dit"))
    base = ["calibrate", "--steps", "2", "--samples", "2", "--device", "cpu", "--no-progress"]
    bad = [
        (["--prompt-embeds", str(prompts)], "--prompt-embeds"),  # a class-label checkpoint: was ignored
        (["--guidance", "4"], "--guidance"),
        (["--max-reuse", "2"], "--max-reuse"),
        (["--holdout", "8"], "--holdout"),
        (["--validate-plans", "3"], "--validate-plans"),
        (["--num-heads", "4"], "--num-heads"),
        (["--checkpoint", ckpt, "--num-heads", "7"], "--num-heads"),
        (["--model", "glyph-dit", "--checkpoint", ckpt], "--model"),
        (["--shift", "3", "--dynamic-shift"], "--shift"),
        (["--seed", str(2**64)], "--seed"),  # was torch's "Overflow when unpacking long long"; -1 is a seed now
        (["--sampler", "rk4"], "--sampler"),
        (["--out", str(tmp / "a_file" / "cal.json")], "--out"),  # failed after the calibration
        (["--search", "steps,polcy"], "--search"),  # the joint search's names
        (["--search", "steps", "--validate"], "--validate"),
        (["--search", "steps,uncond", "--cfg-scale", "1"], "--search"),  # no unconditional branch to forecast
    ]
    for extra, names in bad:
        argv = base + extra + (["--out", out] if "--out" not in extra else [])
        shown = " ".join("FILE" if a == ckpt or a.startswith(str(tmp)) else a for a in extra)
        case("CLI", f"eekernels calibrate {shown}", (names,))(_cli(argv, (names,)))


def _model_config_cases(tmp: Path):
    """``--model-config`` (a PixArt-Σ checkpoint's training config) and calibrate's options as every command
    checks them (eekernels/jobs/options.py)."""
    from eekernels.models.condition import TextCondition, save_prompt_embeds
    from eekernels.models.pixart import PixArt
    from eekernels.models.pretrained import load_model_file, pretrained_path

    kv = "dict(sampling='{}', scale_factor=2, kv_compress_layer=[0, 1])"
    cfg, conv, missing = tmp / "sigma_config.py", tmp / "sigma_conv.py", tmp / "no_config.py"
    cfg.write_text(f"kv_compress = True\nkv_compress_config = {kv.format('uniform')}\n")
    conv.write_text(f"kv_compress = True\nkv_compress_config = {kv.format('conv')}\n")
    sigma = PixArt(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, depth=3, num_heads=2,
                   caption_channels=8, model_max_length=6)
    torch.save({"state_dict": sigma.state_dict_in("original")}, tmp / "sigma.pth")
    prompts = tmp / "sigma_prompts.safetensors"
    save_prompt_embeds(prompts, TextCondition(torch.randn(2, 6, 8)))
    dit, out = str(pretrained_path("glyph-dit")), str(tmp / "calibrated.json")
    on_sigma = ["--checkpoint", str(tmp / "sigma.pth"), "--num-heads", "2", "--prompt-embeds", str(prompts)]
    base = ["calibrate", "--steps", "2", "--samples", "2", "--device", "cpu", "--no-progress", "--out", out]
    bad = [
        (["--seed", str(-2**63 - 1)], "--seed"),
        (["--num-heads", "0"], "--num-heads"),
        (["--checkpoint", dit, "--num-heads", "0"], "--num-heads"),
        (["--size", "0"], "--size"),
        (["--sampler", "flow_euler"], "--sampler"),  # was "sampler: ..."
        (["--model-config", str(cfg)], "--model-config"),
        (["--checkpoint", dit, "--model-config", str(missing)], "--model-config"),
        (["--checkpoint", dit, "--model-config", str(cfg)], "--model-config"),
        (on_sigma + ["--model-config", str(conv)], "kv_compress_config"),
        (on_sigma + ["--model-config", str(cfg), "--size", "6"], "--size"),
    ]
    ft = ["finetune", "--checkpoint", "glyph-dit", "--steps", "1", "--out", str(tmp / "ft")]
    for argv, extra, names in [(base + e, e, n) for e, n in bad] + [(ft + ["--model-config", str(cfg)], ft[1:] + [
            "--model-config", str(cfg)], "--model-config")]:
        shown = " ".join("FILE" if a == dit or a.startswith(str(tmp)) else a for a in extra)
        case("CLI", f"eekernels {argv[0]} {shown}", (names,))(_cli(argv, (names,)))
    case("checkpoints", "load_model_file(a DiT file, config=a PixArt-sigma config)", "config")(
        lambda: load_model_file(dit, config=cfg))


def _tiny_sd3_pipeline():
    """A tiny StableDiffusion3Pipeline without text encoders or VAE (caption embeddings passed in)."""
    import diffusers

    tr = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                         caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
                                         pos_embed_max_size=16)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=tr, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _calibrate_pipeline_cases():
    """eekernels.calibrate(pipe, inputs=...): calibration under a pipeline's own loop (in place)."""
    import diffusers

    def call(steps=2):
        return dict(prompt_embeds=torch.randn(1, 3, 12), pooled_prompt_embeds=torch.randn(1, 10),
                    negative_prompt_embeds=torch.randn(1, 3, 12), negative_pooled_prompt_embeds=torch.randn(1, 10),
                    num_inference_steps=steps, height=16, width=16)

    bad = [
        ("calibrate(pipe) without inputs", dict(), "inputs"),
        ("calibrate(pipe, inputs=[])", dict(inputs=[]), "inputs"),
        ("calibrate(pipe, inputs=[a number])", dict(inputs=[3]), "inputs[0]"),
        ("calibrate(pipe, inputs of different num_inference_steps)", dict(inputs=[call(2), call(3)]), "inputs"),
        ("calibrate(pipe, exit_policy='cache')", dict(inputs=[call()], exit_policy="cache"), "exit_policy"),
        ("calibrate(pipe, steps=4): the pipeline's steps come from inputs", dict(inputs=[call()], steps=4), "steps"),
        ("calibrate(pipe, noises=...)", dict(inputs=[call()], noises=torch.randn(1, 4, 8, 8)), "noises"),
        ("calibrate(pipe, denoiser='unet')", dict(inputs=[call()], denoiser="unet"), "denoiser"),
        ("calibrate(pipe, candidates=[0])", dict(inputs=[call()], candidates=[0]), "candidates"),
        ("calibrate(pipe, budget=0)", dict(inputs=[call()], budget=0), "budget"),
        ("calibrate(pipe, select='best')", dict(inputs=[call()], select="best"), "select"),
        ("calibrate(pipe, objective='rms')", dict(inputs=[call()], objective="rms"), "objective"),
        ("calibrate(pipe, objective=..., select='proxy')", dict(inputs=[call()], objective=lambda x, r: 0.0,
                                                                 select="proxy"), "objective"),
        ("calibrate(pipe, an input whose run is not reproducible)",
         dict(inputs=[lambda p, g=torch.Generator().manual_seed(0): p(**call(), generator=g, output_type="latent")]),
         "inputs[0]"),
    ]
    for description, kw, names in bad:
        case("calibrate (pipeline)", description, names)(lambda kw=kw: eekernels.calibrate(_tiny_sd3_pipeline(), **kw))

    class Unregistered(diffusers.DiffusionPipeline):
        def __init__(self, net, scheduler):
            super().__init__()
            self.register_modules(net=net, scheduler=scheduler)

    case("calibrate (pipeline)", "calibrate(a pipeline of no registered family)", "model")(
        lambda: eekernels.calibrate(Unregistered(torch.nn.Linear(2, 2), diffusers.DDIMScheduler()), inputs=[{}]))


_calibrate_pipeline_cases()


def _finetune_inplace_cases():
    """eekernels.finetune_inplace(pipe, inputs=...): fine-tuning a pipeline's own denoiser (in place)."""
    import diffusers

    call = dict(prompt_embeds=torch.randn(1, 3, 12), pooled_prompt_embeds=torch.randn(1, 10), num_inference_steps=2,
                height=16, width=16, guidance_scale=1.0)
    two = eekernels.ExitSchedule([1], 2)
    bad = [
        ("finetune_inplace(pipe, inputs=[])", dict(inputs=[], schedule=two), "inputs"),
        ("finetune_inplace(pipe, steps=0)", dict(inputs=[call], schedule=two, steps=0), "steps"),
        ("finetune_inplace(pipe, lr=-1)", dict(inputs=[call], schedule=two, lr=-1.0), "lr"),
        ("finetune_inplace(pipe, lora_rank=0)", dict(inputs=[call], schedule=two, lora_rank=0), "lora_rank"),
        ("finetune_inplace(pipe, lora_alpha without lora_rank)", dict(inputs=[call], schedule=two, lora_alpha=2.0),
         "lora_alpha"),
        ("finetune_inplace(pipe, lora_targets naming no module)",
         dict(inputs=[call], schedule=two, lora_rank=2, lora_targets=["nope"]), "lora_targets"),
        ("finetune_inplace(a plain pipe, schedule=None)", dict(inputs=[call]), "schedule"),
        ("finetune_inplace(pipe, a schedule deeper than the model)",
         dict(inputs=[call], schedule=eekernels.ExitSchedule([5], 5)), "schedule"),
        ("finetune_inplace(pipe, out=3)", dict(inputs=[call], schedule=two, out=3), "out"),
    ]
    for description, kw, names in bad:
        case("finetune (pipeline)", description, names)(lambda kw=kw: eekernels.finetune_inplace(_tiny_sd3_pipeline(), **kw))


_finetune_inplace_cases()


def _depth0_cases():
    """Depth 0 in place (no block runs; the cache or forecast gives the whole stack's residual): what cannot run it
    is refused by name before any block runs."""
    import diffusers

    from eekernels import inplace

    S = eekernels.ExitSchedule

    def transformer(policy, schedule):
        return eekernels.accelerate(_tiny_sd3_pipeline().transformer, schedule=schedule, exit_policy=policy)

    def unet():
        torch.manual_seed(0)
        return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                     block_out_channels=(8, 16), norm_num_groups=4,
                                     down_block_types=("DownBlock2D", "DownBlock2D"),
                                     up_block_types=("UpBlock2D", "UpBlock2D"))

    def at_depth_0_under_drop():
        with inplace.at_depth(transformer("drop", S.periodic(2, 1, 2)), 0):
            pass

    case("depth 0 (in place)", "accelerate(exit_policy='drop', a schedule with depth 0)", "schedule")(
        lambda: transformer("drop", S.periodic(2, 0, 2)))
    case("depth 0 (in place)", "accelerate(a U-Net, exit_policy='cache', a schedule with depth 0)", "schedule")(
        lambda: eekernels.accelerate(unet(), schedule=S.periodic(2, 0, 2), exit_policy="cache"))
    case("depth 0 (in place)", "inplace.at_depth(a model under exit_policy='drop', 0)", "depth")(at_depth_0_under_drop)


_depth0_cases()


def _calibrate_objective_cases():
    """calibrate(model, objective=...): what the closed loop ranks by; a bad one is refused before any sampling."""
    from eekernels.eval.fidelity import frechet_to

    noises = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))

    def cal(**kw):
        return lambda: eekernels.calibrate(_tiny_dit(), noises=noises, conditions=torch.tensor([1, 2]), steps=3,
                                           sampler="ddim", **kw)

    for shown, kw in (("a string", dict(objective="frechet", exit_policy="forecast")),
                      ("returning NaN", dict(objective=lambda x, r: float("nan"), exit_policy="forecast")),
                      ("returning None", dict(objective=lambda x, r: None, select="closed-loop", exit_policy="cache")),
                      ("returning a 2-element tensor", dict(objective=lambda x, r: x[:2, 0, 0, 0], search="steps")),
                      ("without a closed loop (select='proxy')", dict(objective=lambda x, r: 0.0))):
        case("calibrate objective", f"calibrate(objective {shown})", "objective")(cal(**kw))
    for shown, args in (("features=None", (None, torch.zeros(2, 3, 8, 8))),
                        ("one real image", (len, torch.zeros(1, 3))), ("real a list", (len, [1, 2]))):
        names = "features" if shown.startswith("features") else "real"
        case("calibrate objective", f"frechet_to({shown})", names)(lambda a=args: frechet_to(*a))


_calibrate_objective_cases()


def _fastercache_peer_cases():
    """diffusers' FasterCache as a peer (eval.baselines): it skips the unconditional half of a CFG batch, so a
    batch that is not [cond; uncond] is refused before the hook splits it; its periods are counts."""
    from eekernels.eval.baselines import DiffusersCacheDiT, fastercache_config

    m = _tiny_dit()
    x, y, t = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 4]), torch.full((4,), 500.0)
    peer = lambda: DiffusersCacheDiT(m, fastercache_config(2, 1000.0))  # noqa: E731
    case("peers", "FasterCache peer called without a CFG batch", "y")(lambda: peer()(x, t, y))
    case("peers", "FasterCache peer sampled with cfg_scale=1", "y")(
        lambda: eekernels.sample(peer(), x, y, sampler="ddim", steps=2, cfg_scale=1.0))
    case("peers", "fastercache_config(uncond_every=0)", "uncond_every")(lambda: fastercache_config(0, 1000.0))
    case("peers", "fastercache_config(attention_every=1.5)", "attention_every")(
        lambda: fastercache_config(2, 1000.0, 1.5))


_fastercache_peer_cases()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="also write every case and its outcome to this file")
    parser.add_argument("--verbose", action="store_true", help="print every case that is not 'named'")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _loader_cases(tmp)
        _cli_cases(tmp)
        _data_cases(tmp)
        _schedule_file_cases(tmp)
        _calibrate_cli_cases(tmp)
        _model_config_cases(tmp)
        rows = []
        for category, description, fn, names in CASES:
            outcome, detail = classify(fn, names)
            rows.append(dict(category=category, case=description, outcome=outcome, detail=detail))
    cats = list(dict.fromkeys(r["category"] for r in rows))
    print("| category | inputs tried | named errors | torch schema errors | unnamed errors | crashes "
          "| silent acceptances | data lost |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for cat in cats + ["all"]:
        sel = [r for r in rows if cat in ("all", r["category"])]
        counts = [sum(r["outcome"] == o for r in sel) for o in OUTCOMES]
        label = "**all**" if cat == "all" else cat
        print(f"| {label} | {len(sel)} | " + " | ".join(map(str, counts)) + " |")
    if args.verbose:
        for r in rows:
            if r["outcome"] != "named":
                print(f"  [{r['outcome']}] {r['category']}: {r['case']}: {r['detail']}", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
