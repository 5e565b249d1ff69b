"""Solvers as per-call coefficient tables: DDPM, DDIM, DPM-Solver++ (2M), Euler and Heun.

Every solver is written the same way, so that one sampling step can run eagerly or as a CUDA graph replay:
- at construction, on the host and in float64, it computes a table with one row per *model call*: the
  timestep the model sees, the input scale and the update's coefficients (``Solver.table``);
- ``Solver.update(state, row, eps, var)`` is the update, branch-free in the call index: it reads its
  coefficients from ``row`` (the table row at the device-side step counter) and updates the static buffers
  of a ``SolverState`` in place. Nothing in it depends on a host value that changes from step to step.

The tables reproduce diffusers' schedulers (``DDPMScheduler``, ``DDIMScheduler``,
``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")``, ``EulerDiscreteScheduler``,
``HeunDiscreteScheduler``) for the options they share, with diffusers' argument names and meanings.
The betas are computed in float32 exactly as diffusers computes them; the coefficients derived from them in
float64. Defaults are DiT's noise schedule: linear betas 1e-4 .. 0.02 over 1000 training steps.

Step by step (the same arithmetic ``sample()`` runs)::

    solver = DDIM(steps=50, eta=0.0)
    x = noise * solver.init_noise_sigma
    for t in solver.timesteps:
        out = model(solver.scale_model_input(x), t.expand(len(x)), y)
        x = solver.step(out, x, generator=g)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# Every spacing some solver takes; "respaced" (ADM/DiT's ``space_timesteps``) only DDIM and DDPM (``Solver.SPACINGS``).
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing", "respaced")

# Options every solver accepts (diffusers' names), with DiT's noise schedule as the default.
_COMMON = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", steps_offset=0)


# ---- noise schedule, exactly as diffusers builds it ----------------------------------------------------------

def _alpha_bar_cosine(t: float) -> float:
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2


def alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> np.ndarray:
    """The cumulative product of (1 - beta), shape (num_train_timesteps,), float32 values as diffusers has them."""
    T = num_train_timesteps
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    else:  # squaredcos_cap_v2: the cosine schedule of improved DDPM, betas capped at 0.999
        betas = torch.tensor([min(1 - _alpha_bar_cosine((i + 1) / T) / _alpha_bar_cosine(i / T), 0.999)
                              for i in range(T)], dtype=torch.float32)
    # float32 cumprod on purpose: a user coming from diffusers gets the same alphas, hence the same trajectory.
    return torch.cumprod(1.0 - betas, dim=0).numpy()


def alphas_cumprod_adm(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> np.ndarray:
    """The same schedules in float64 throughout, as ADM / DiT's ``GaussianDiffusion`` builds them ("respaced")."""
    T = num_train_timesteps
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif beta_schedule == "scaled_linear":  # ADM's "quad"
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    else:
        betas = np.array([min(1 - _alpha_bar_cosine((i + 1) / T) / _alpha_bar_cosine(i / T), 0.999) for i in range(T)])
    return np.cumprod(1.0 - betas)


def respaced_timesteps(T: int, N: int) -> np.ndarray:
    """ADM's ``space_timesteps(T, [N])`` (DiT's ``create_diffusion(str(N))``), descending int64: one section,
    stride (T - 1) / (N - 1) accumulated in float and rounded, exactly as ADM's loop does."""
    stride = 1 if N <= 1 else (T - 1) / (N - 1)
    cur, taken = 0.0, []
    for _ in range(N):
        taken.append(round(cur))
        cur += stride
    return np.array(sorted(set(taken), reverse=True), dtype=np.int64)


def _integer_timesteps(spacing: str, T: int, N: int, offset: int) -> np.ndarray:
    """DDPM/DDIM timesteps, descending int64 (diffusers' ``set_timesteps``; "respaced": ADM's, no offset)."""
    if spacing == "respaced":
        return respaced_timesteps(T, N)
    if spacing == "linspace":
        return np.linspace(0, T - 1, N).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, N) * (T // N)).round()[::-1].copy().astype(np.int64) + offset
    return np.round(np.arange(T, 0, -T / N)).astype(np.int64) - 1  # trailing


def _sigma_timesteps(spacing: str, T: int, N: int, offset: int) -> np.ndarray:
    """Euler/Heun timesteps: float32 and, with ``linspace``, fractional (diffusers' ``set_timesteps``)."""
    if spacing == "linspace":
        return np.linspace(0, T - 1, N, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, N) * (T // N)).round()[::-1].copy().astype(np.float32) + offset
    return np.arange(T, 0, -T / N).round().copy().astype(np.float32) - 1  # trailing


def _karras_sigmas(ac: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """sigma = sqrt((1 - a)/a), interpolated at (fractional) timesteps, then a final 0; float32 as diffusers."""
    sigmas = ((1 - torch.from_numpy(ac)) / torch.from_numpy(ac)) ** 0.5  # float32 arithmetic, as diffusers
    sig = np.interp(timesteps, np.arange(0, len(sigmas)), sigmas.numpy())
    return np.concatenate([sig, [0.0]]).astype(np.float32).astype(np.float64)


# ---- state -----------------------------------------------------------------------------------------------------

@dataclass
class SolverState:
    """Static buffers of one trajectory: what a CUDA graph reads and writes in place.

    x: (B, C, ...) the sample, in float32 (float64 if the noise is float64); aux: solver history
    (e.g. DPM-Solver++'s previous x0, Heun's saved sample and derivative); noise: the fresh noise of the
    current call (stochastic solvers); table: (num_calls, K) coefficients on the device; counter: (1,) int64,
    the index of the next model call, incremented on the device.
    """

    x: torch.Tensor
    table: torch.Tensor
    counter: torch.Tensor
    noise: torch.Tensor | None = None
    aux: dict[str, torch.Tensor] = field(default_factory=dict)

    def row(self) -> torch.Tensor:
        """(K,) coefficients of the current call: a device gather, no host sync."""
        return self.table.index_select(0, self.counter)[0]

    def mutable(self) -> list[torch.Tensor]:
        """The buffers a step writes (saved and restored around a graph's warm-up)."""
        return [self.x, self.counter, *self.aux.values()]


def split_output(out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """eps (B, C, ...) and, for learned-sigma models (2C output channels), the variance channels (B, C, ...)."""
    if out.dim() < 2 or out.shape[1] not in (channels, 2 * channels):
        raise ValueError(f"model output: expected shape (B, {channels} or {2 * channels}, ...) for samples with "
                         f"{channels} channels, got {tuple(out.shape)}")
    if out.shape[1] == channels:
        return out, None
    return out[:, :channels], out[:, channels:]


# ---- base --------------------------------------------------------------------------------------------------------

class Solver:
    """A diffusion solver as a table of per-call coefficients plus an in-place, branch-free update."""

    name = ""
    OPTIONS: dict = {}
    COLUMNS: tuple[str, ...] = ()  # table columns besides "t" (model timestep) and "c_in" (input scale)
    AUX: tuple[str, ...] = ()      # history buffers, shaped like x
    SPACINGS: tuple[str, ...] = ("leading", "linspace", "trailing")  # the timestep_spacing values it takes
    scales_input = False           # Euler/Heun feed x / sqrt(sigma^2 + 1) to the model
    #: What the model's output is taken to be: "epsilon" (the noise) or "flow" (the velocity, flow matching).
    prediction = "epsilon"
    COMMON: dict = _COMMON         # options every solver of this kind takes

    def __init__(self, steps: int = 50, **options):
        valid = {**self.COMMON, **self.OPTIONS}
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"{self.name}: unknown solver option(s) {unknown}; valid options: {sorted(valid)}")
        self.options = {**valid, **options}
        o = self.options
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
        T = o["num_train_timesteps"]
        if isinstance(T, bool) or not isinstance(T, int) or T < 2:
            raise ValueError(f"num_train_timesteps: expected an integer >= 2, got {T!r}")
        if steps > T:
            raise ValueError(f"steps: expected at most num_train_timesteps={T}, got {steps}")
        self.steps = steps
        self.init_noise_sigma = 1.0
        self._prepare(steps)
        cols = self._build(steps)  # name -> float64 array, one entry per model call
        self.columns = ("t", "c_in", *self.COLUMNS)
        self.col = {c: j for j, c in enumerate(self.columns)}
        n = len(cols["t"])
        cols.setdefault("c_in", np.ones(n))
        self.table = torch.tensor(np.stack([np.asarray(cols[c], dtype=np.float64) for c in self.columns], 1))
        self.timesteps = self.table[:, 0].to(torch.float32)  # what the model sees, per call
        self.noise_at: tuple[bool, ...] = tuple(bool(v) for v in cols.get("_noise", np.zeros(n)))
        self.reset()

    def _prepare(self, steps: int) -> None:
        """Validate the noise-schedule options and build ``alphas_cumprod`` (flow solvers: their sigmas)."""
        o = self.options
        T = o["num_train_timesteps"]
        if o["beta_schedule"] not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule: expected one of {BETA_SCHEDULES}, got {o['beta_schedule']!r}")
        if o["timestep_spacing"] not in self.SPACINGS:
            raise ValueError(f"timestep_spacing: expected one of {self.SPACINGS} for {self.name}, "
                             f"got {o['timestep_spacing']!r}")
        if not (0 < o["beta_start"] <= o["beta_end"] < 1):
            raise ValueError(f"beta_start, beta_end: expected 0 < beta_start <= beta_end < 1, "
                             f"got {o['beta_start']}, {o['beta_end']}")
        # "respaced" reproduces ADM / DiT, whose betas are float64 (float32 ones differ by ~1e-4 near t = 0).
        make_ac = alphas_cumprod_adm if o["timestep_spacing"] == "respaced" else alphas_cumprod
        self.alphas_cumprod = make_ac(T, o["beta_start"], o["beta_end"], o["beta_schedule"])

    # Subclasses: fill the columns (and "_noise": which calls draw fresh noise) for `steps` steps.
    def _build(self, steps: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def update(self, st: SolverState, row: torch.Tensor, eps: torch.Tensor, var: torch.Tensor | None) -> None:
        """Advance ``st.x`` by one model call, in place. eps, var: (B, C, ...) in the state's dtype."""
        raise NotImplementedError

    def c(self, row: torch.Tensor, name: str) -> torch.Tensor:
        return row[self.col[name]]

    @property
    def num_calls(self) -> int:
        """Model calls per trajectory (Heun: 2 * steps - 1)."""
        return self.table.shape[0]

    @property
    def stochastic(self) -> bool:
        return any(self.noise_at)

    def signature(self) -> tuple:
        """Everything the table depends on: equal signatures give equal tables (graph reuse across runs)."""
        return (type(self).__name__, self.steps, tuple(sorted(self.options.items())))

    def new_state(self, x: torch.Tensor) -> SolverState:
        """Static buffers for a trajectory starting at ``x`` (already scaled by ``init_noise_sigma``)."""
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        xs = x.detach().to(dtype=dtype, copy=True)
        return SolverState(
            x=xs,
            table=self.table.to(device=x.device, dtype=dtype),
            counter=torch.zeros(1, dtype=torch.int64, device=x.device),
            noise=torch.zeros_like(xs) if self.stochastic else None,
            aux={name: torch.zeros_like(xs) for name in self.AUX},
        )

    # ---- step-by-step API (diffusers-like) ----

    def reset(self) -> None:
        """Forget the trajectory: the next ``step`` is call 0."""
        self.step_index = 0
        self._state: SolverState | None = None

    def scale_model_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the model gets at the current call (Euler/Heun divide by sqrt(sigma^2 + 1))."""
        if not self.scales_input:
            return x
        return x * float(self.table[self.step_index, self.col["c_in"]])

    def step(self, model_output: torch.Tensor, x: torch.Tensor, *, generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """One model call's update: model_output (B, C or 2C, ...), x (B, C, ...) -> the next x, same dtype."""
        if self.step_index >= self.num_calls:
            raise ValueError(f"step: all {self.num_calls} calls are done; call reset() for a new trajectory")
        st = self._state
        if st is None or st.x.shape != x.shape or st.x.device != x.device:
            st = self._state = self.new_state(x)
            st.counter.fill_(self.step_index)
        st.x.copy_(x)
        if self.noise_at[self.step_index]:
            if noise is not None:
                st.noise.copy_(noise)
            else:
                draw_noise(st.noise, generator)
        eps, var = split_output(model_output, x.shape[1])
        self.update(st, st.row(), eps.to(st.x.dtype), None if var is None else var.to(st.x.dtype))
        st.counter.add_(1)
        self.step_index += 1
        return st.x.to(dtype=x.dtype, copy=True)

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}(steps={self.steps}, {opts})"


def draw_noise(buf: torch.Tensor, generator: torch.Generator | None) -> None:
    """Fill ``buf`` with N(0, 1) drawn as diffusers' ``randn_tensor`` does (a CPU generator draws on the CPU)."""
    gen_device = generator.device if generator is not None else buf.device
    if torch.device(gen_device).type == buf.device.type:
        buf.normal_(generator=generator)
    else:
        buf.copy_(torch.randn(buf.shape, generator=generator, device=gen_device, dtype=buf.dtype))


def _check_clip(name: str, o: dict) -> None:
    if not o["clip_sample_range"] > 0:
        raise ValueError(f"{name}: clip_sample_range: expected > 0, got {o['clip_sample_range']}")


# ---- DDIM ----------------------------------------------------------------------------------------------------------

class DDIM(Solver):
    """DDIM (Song et al.) with ``eta``: diffusers' ``DDIMScheduler`` (epsilon prediction). With
    ``timestep_spacing="respaced"``: ADM / DiT's ``ddim_sample`` on ``create_diffusion(str(steps))`` (ADM's
    timesteps, float64 betas, alpha-bar_prev at the next kept timestep, 1 after the last)."""

    name = "ddim"
    SPACINGS = TIMESTEP_SPACINGS
    OPTIONS = dict(timestep_spacing="leading", eta=0.0, clip_sample=False, clip_sample_range=1.0,
                   set_alpha_to_one=True)
    COLUMNS = ("s0", "s1", "p0", "p1", "std")

    def _build(self, N):
        o, ac = self.options, self.alphas_cumprod.astype(np.float64)
        T = o["num_train_timesteps"]
        if not (o["eta"] >= 0 and math.isfinite(o["eta"])):
            raise ValueError(f"ddim: eta: expected >= 0 and finite, got {o['eta']}")
        _check_clip(self.name, o)
        ts = _integer_timesteps(o["timestep_spacing"], T, N, o["steps_offset"])
        if ts.max() >= T:
            raise ValueError(f"steps_offset: timesteps reach {ts.max()} >= num_train_timesteps={T}")
        # diffusers' rule for its spacings; ADM's respacing steps to the next kept timestep.
        prev = np.append(ts[1:], -1) if o["timestep_spacing"] == "respaced" else ts - T // N
        final = 1.0 if o["set_alpha_to_one"] else ac[0]
        ab = ac[ts]
        ab_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], final)
        variance = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)
        std = o["eta"] * np.sqrt(variance)
        return dict(t=ts.astype(np.float64), s0=np.sqrt(ab), s1=np.sqrt(1 - ab), p0=np.sqrt(ab_prev),
                    p1=np.sqrt(np.clip(1 - ab_prev - std**2, 0, None)), std=std,
                    _noise=np.full(N, o["eta"] > 0))

    def update(self, st, row, eps, var):
        c = lambda k: self.c(row, k)  # noqa: E731
        x0 = (st.x - c("s1") * eps) / c("s0")
        if self.options["clip_sample"]:
            r = self.options["clip_sample_range"]
            x0 = x0.clamp(-r, r)
        x_new = c("p0") * x0 + c("p1") * eps
        if st.noise is not None:
            x_new = x_new + c("std") * st.noise
        st.x.copy_(x_new)


# ---- DDPM (ancestral) ----------------------------------------------------------------------------------------------

class DDPM(Solver):
    """Ancestral DDPM: diffusers' ``DDPMScheduler``. With a learned-sigma model, the learned-range variance of
    DiT/ADM (``variance_type="learned_range"``, chosen automatically when the model returns 2C channels).
    With ``timestep_spacing="respaced"``: ADM / DiT's ``p_sample`` on ``create_diffusion(str(steps))`` (ADM's
    timesteps and float64 betas; betas recomputed from the kept alpha-bars, 1 - abar[t_i] / abar[t_(i-1)])."""

    name = "ddpm"
    SPACINGS = TIMESTEP_SPACINGS
    VARIANCE_TYPES = (None, "fixed_small", "fixed_large", "learned_range")
    OPTIONS = dict(timestep_spacing="leading", clip_sample=False, clip_sample_range=1.0, variance_type=None)
    COLUMNS = ("s0", "s1", "c0", "c1", "std", "min_log", "max_log", "flag")

    def _build(self, N):
        o, ac = self.options, self.alphas_cumprod.astype(np.float64)
        T = o["num_train_timesteps"]
        if o["variance_type"] not in self.VARIANCE_TYPES:
            raise ValueError(f"ddpm: variance_type: expected one of {self.VARIANCE_TYPES}, got {o['variance_type']!r}")
        _check_clip(self.name, o)
        ts = _integer_timesteps(o["timestep_spacing"], T, N, o["steps_offset"])
        if ts.max() >= T:
            raise ValueError(f"steps_offset: timesteps reach {ts.max()} >= num_train_timesteps={T}")
        prev = np.append(ts[1:], -1)  # the next timestep in the list (diffusers' previous_timestep)
        ab = ac[ts]
        ab_prev = np.where(prev >= 0, ac[np.clip(prev, 0, None)], 1.0)
        beta = 1 - ab / ab_prev
        var = np.clip((1 - ab_prev) / (1 - ab) * beta, 1e-20, None)
        flag = (ts > 0).astype(np.float64)  # diffusers adds no noise at t = 0
        std = np.sqrt(beta if o["variance_type"] == "fixed_large" else var) * flag
        with np.errstate(divide="ignore"):
            max_log = np.log(beta)
        return dict(t=ts.astype(np.float64), s0=np.sqrt(ab), s1=np.sqrt(1 - ab),
                    c0=np.sqrt(ab_prev) * beta / (1 - ab), c1=np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab),
                    std=std, min_log=np.log(var), max_log=max_log, flag=flag, _noise=ts > 0)

    def update(self, st, row, eps, var):
        c = lambda k: self.c(row, k)  # noqa: E731
        vt = self.options["variance_type"]
        if vt == "learned_range" and var is None:
            raise ValueError("ddpm: variance_type='learned_range' needs a learned-sigma model (2C output channels)")
        x0 = (st.x - c("s1") * eps) / c("s0")
        if self.options["clip_sample"]:
            r = self.options["clip_sample_range"]
            x0 = x0.clamp(-r, r)
        x_new = c("c0") * x0 + c("c1") * st.x
        if st.noise is None:  # no call adds noise (a single step, at t = 0)
            pass
        elif var is not None and vt in (None, "learned_range"):
            # ADM / DiT: the model interpolates the log variance between the posterior's and beta_t.
            frac = (var + 1) / 2
            log_var = frac * c("max_log") + (1 - frac) * c("min_log")
            x_new = x_new + c("flag") * torch.exp(0.5 * log_var) * st.noise
        else:
            x_new = x_new + c("std") * st.noise
        st.x.copy_(x_new)


# ---- DPM-Solver++ (2M) ---------------------------------------------------------------------------------------------

def dpm2m_coefficients(alpha: np.ndarray, sigma: np.ndarray, N: int, order: int):
    """DPM-Solver++(2M, midpoint) with final sigma 0: ``x_{k+1} = a[k] x_k + b[k] D_k + c[k] D_{k-1}`` (D: the
    x0 prediction) from the N + 1 values of alpha and sigma (the last sigma 0). First order at the first call
    and at the last (diffusers: the final sigma 0 forces it), and everywhere with ``order`` 1."""
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(sigma)  # +inf at the final sigma 0
    a, b, c = np.zeros(N), np.zeros(N), np.zeros(N)
    for k in range(N):
        h = lam[k + 1] - lam[k]
        em1 = math.expm1(-h) if math.isfinite(h) else -1.0  # exp(-h) - 1
        a[k] = sigma[k + 1] / sigma[k]
        b[k] = -alpha[k + 1] * em1
        if order == 2 and 0 < k < N - 1:
            r0 = (lam[k] - lam[k - 1]) / h
            b[k] = -alpha[k + 1] * em1 * (1 + 0.5 / r0)
            c[k] = 0.5 * alpha[k + 1] * em1 / r0
    return a, b, c


class DPMSolverPP(Solver):
    """Multistep DPM-Solver++ (2M, midpoint): diffusers' ``DPMSolverMultistepScheduler(algorithm_type=
    "dpmsolver++")`` with final sigma 0. The previous step's x0 prediction lives in a static buffer."""

    name = "dpmsolver++"
    OPTIONS = dict(timestep_spacing="linspace", solver_order=2)
    COLUMNS = ("xa", "xs", "a", "b", "c")
    AUX = ("m1",)

    def _build(self, N):
        o, ac = self.options, self.alphas_cumprod
        T = o["num_train_timesteps"]
        if o["solver_order"] not in (1, 2):
            raise ValueError(f"dpmsolver++: solver_order: expected 1 or 2, got {o['solver_order']!r}")
        sp, off = o["timestep_spacing"], o["steps_offset"]
        if sp == "linspace":
            ts = np.linspace(0, T - 1, N + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif sp == "leading":
            ts = (np.arange(0, N + 1) * (T // (N + 1))).round()[::-1][:-1].copy().astype(np.int64) + off
        else:
            ts = np.arange(T, 0, -T / N).round().copy().astype(np.int64) - 1
        sig = _karras_sigmas(ac, ts)  # N + 1 values, the last 0
        alpha = 1 / np.sqrt(sig**2 + 1)
        sigma = sig * alpha
        a, b, c = dpm2m_coefficients(alpha, sigma, N, o["solver_order"])
        return dict(t=ts.astype(np.float64), xa=alpha[:N], xs=sigma[:N], a=a, b=b, c=c)

    def update(self, st, row, eps, var):
        c = lambda k: self.c(row, k)  # noqa: E731
        x0 = (st.x - c("xs") * eps) / c("xa")
        m1 = st.aux["m1"]
        st.x.copy_(c("a") * st.x + c("b") * x0 + c("c") * m1)
        m1.copy_(x0)


# ---- Euler ---------------------------------------------------------------------------------------------------------

class Euler(Solver):
    """Euler in sigma space: diffusers' ``EulerDiscreteScheduler`` (no churn). The model gets
    x / sqrt(sigma^2 + 1) and the (fractional, with ``linspace``) timestep."""

    name = "euler"
    OPTIONS = dict(timestep_spacing="linspace")
    COLUMNS = ("dt",)
    scales_input = True

    def _build(self, N):
        ts, sig = _sigma_schedule(self, N)
        return dict(t=ts, c_in=1 / np.sqrt(sig[:N] ** 2 + 1), dt=sig[1:] - sig[:N])

    def update(self, st, row, eps, var):
        st.x.add_(self.c(row, "dt") * eps)


def _sigma_schedule(solver: Solver, N: int) -> tuple[np.ndarray, np.ndarray]:
    """Euler's and Heun's N timesteps and N + 1 sigmas (the last 0); sets ``solver.init_noise_sigma``."""
    o = solver.options
    spacing = o["timestep_spacing"]
    ts = _sigma_timesteps(spacing, o["num_train_timesteps"], N, o["steps_offset"]).astype(np.float64)
    sig = _karras_sigmas(solver.alphas_cumprod, ts)
    s = float(np.float32(sig.max()))
    solver.init_noise_sigma = s if spacing in ("linspace", "trailing") else float(np.float32(math.sqrt(s * s + 1)))
    return ts, sig


# ---- Heun ----------------------------------------------------------------------------------------------------------

class Heun(Solver):
    """Heun (2nd order) in sigma space: diffusers' ``HeunDiscreteScheduler``. 2 * steps - 1 model calls:
    even calls take an Euler step and save (x, d); odd calls correct it with the mean derivative; the last
    step (to sigma 0) is Euler's. The model sees diffusers' repeated timesteps."""

    name = "heun"
    OPTIONS = dict(timestep_spacing="linspace")
    COLUMNS = ("dt", "first")
    AUX = ("xs", "d")
    scales_input = True

    def _build(self, N):
        ts, sig = _sigma_schedule(self, N)
        # Call k: even k takes the Euler step sig[k/2] -> sig[k/2 + 1]; odd k corrects it, evaluated at its end.
        k = np.arange(2 * N - 1)
        first = k % 2 == 0
        step = k // 2            # the step this call belongs to
        at = (k + 1) // 2        # where the model is evaluated: diffusers' [t0, t1, t1, t2, t2, ...]
        return dict(t=ts[at], c_in=1 / np.sqrt(sig[at] ** 2 + 1), dt=sig[step + 1] - sig[step],
                    first=first.astype(np.float64))

    def update(self, st, row, eps, var):
        dt, first = self.c(row, "dt"), self.c(row, "first") > 0.5
        xs, d = st.aux["xs"], st.aux["d"]
        # Both branches are computed and selected on the device: one graph serves even and odd calls.
        x_new = torch.where(first, st.x + dt * eps, xs + dt * ((d + eps) / 2))
        xs.copy_(torch.where(first, st.x, xs))
        d.copy_(torch.where(first, eps, d))
        st.x.copy_(x_new)


# ---- flow matching (rectified flow: x_sigma = (1 - sigma) x0 + sigma noise, model output = velocity) ---------------

TIME_SHIFT_TYPES = ("exponential", "linear")
#: The flow solvers' unshifted sigma grids (``sigma_grid``): "scheduler", the diffusers scheduler's own default
#: (FlowMatchEulerDiscreteScheduler: ``linspace(1, 1/T, N)`` of the training sigmas, what SD3's pipeline uses);
#: "flux", ``linspace(1, 0, N + 1)``: black-forest-labs' ``get_schedule`` and diffusers' ``FluxPipeline`` (which
#: passes ``sigmas=linspace(1, 1/N, N)``). A model declares its family's grid as ``model.sigma_grid``.
SIGMA_GRIDS = ("scheduler", "flux")

# Options every flow solver accepts (diffusers' names; ``shift`` is DPMSolverMultistepScheduler's ``flow_shift``).
_FLOW_COMMON = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, mu=None, image_seq_len=None,
                    base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15,
                    time_shift_type="exponential", sigmas=None, sigma_grid="scheduler")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """The dynamic-shifting exponent mu for ``image_seq_len`` image tokens, as diffusers' SD3 and FLUX pipelines
    compute it: linear in the token count through (base_seq_len, base_shift) and (max_seq_len, max_shift).

    The token count is the transformer's: SD3 ``(H // 8 // 2) * (W // 8 // 2)`` for an H x W image (latent / patch
    2); FLUX ``(H // 16) * (W // 16)`` (2x2-packed latents)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def _number(name: str, v, *, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not math.isfinite(v):
        raise ValueError(f"{name}: expected a finite number, got {v!r}")
    if positive and not v > 0:
        raise ValueError(f"{name}: expected a number > 0, got {v!r}")
    return float(v)


class FlowSolver(Solver):
    """Base of the flow-matching solvers: the model output is the velocity v = d x / d sigma (``prediction =
    "flow"``), the model sees t = sigma * num_train_timesteps, and sampling starts from x = noise (sigma 1;
    ``init_noise_sigma`` 1).

    Sigmas, as diffusers builds them (``_flow_sigmas``): the solver's default grid (``sigma_grid="scheduler"``),
    FLUX's ``linspace(1, 1/N, N)`` (``sigma_grid="flux"``, ``SIGMA_GRIDS``) or the caller's ``sigmas`` (one per
    step, descending in (0, 1]), then shifted: ``shift * s / (1 + (shift - 1) * s)``, or with
    ``use_dynamic_shifting=True`` the resolution-dependent shift of exponent ``mu`` (``time_shift_type``
    "exponential": ``e^mu / (e^mu + (1/s - 1))``; "linear": ``mu / (mu + (1/s - 1))``). Instead of ``mu`` one may
    give ``image_seq_len``: mu is then ``calculate_shift(image_seq_len, base_image_seq_len, max_image_seq_len,
    base_shift, max_shift)``, as the SD3 / FLUX pipelines compute it. A final sigma 0 is appended."""

    prediction = "flow"
    COMMON = _FLOW_COMMON
    SPACINGS = ()

    def _prepare(self, steps: int) -> None:
        o = self.options
        T = o["num_train_timesteps"]
        o["shift"] = _number("shift", o["shift"], positive=True)
        if not isinstance(o["use_dynamic_shifting"], bool):
            raise ValueError(f"use_dynamic_shifting: expected a bool, got {o['use_dynamic_shifting']!r}")
        if o["time_shift_type"] not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type: expected one of {TIME_SHIFT_TYPES}, got {o['time_shift_type']!r}")
        for k in ("base_shift", "max_shift"):
            o[k] = _number(k, o[k])
        for k in ("base_image_seq_len", "max_image_seq_len"):
            if isinstance(o[k], bool) or not isinstance(o[k], int) or o[k] < 1:
                raise ValueError(f"{k}: expected an integer >= 1, got {o[k]!r}")
        if o["max_image_seq_len"] == o["base_image_seq_len"]:
            raise ValueError(f"max_image_seq_len: expected a value different from base_image_seq_len "
                             f"({o['base_image_seq_len']}), got {o['max_image_seq_len']}")
        mu, seq = o["mu"], o["image_seq_len"]
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or seq < 1):
            raise ValueError(f"image_seq_len: expected an integer >= 1 (the transformer's image tokens), got {seq!r}")
        if mu is not None and seq is not None:
            raise ValueError(f"mu, image_seq_len: expected one of them (mu is computed from image_seq_len), got "
                             f"mu={mu!r} and image_seq_len={seq!r}")
        if (mu is not None or seq is not None) and not o["use_dynamic_shifting"]:
            raise ValueError(f"{'mu' if mu is not None else 'image_seq_len'}: only used with use_dynamic_shifting=True "
                             "(which replaces `shift`), got use_dynamic_shifting=False")
        if o["use_dynamic_shifting"]:
            if mu is None and seq is None:
                raise ValueError("mu: use_dynamic_shifting=True expected `mu` or `image_seq_len` (mu = "
                                 "calculate_shift(image_seq_len, ...), as the SD3 / FLUX pipelines do), got neither")
            self.mu = _number("mu", mu) if mu is not None else calculate_shift(
                seq, o["base_image_seq_len"], o["max_image_seq_len"], o["base_shift"], o["max_shift"])
            if o["time_shift_type"] == "linear" and not self.mu > 0:
                raise ValueError(f"mu: time_shift_type='linear' expected mu > 0, got {self.mu}")
        else:
            self.mu = None
        if o["sigma_grid"] not in SIGMA_GRIDS:
            raise ValueError(f"sigma_grid: expected one of {SIGMA_GRIDS}, got {o['sigma_grid']!r}")
        if o["sigmas"] is not None and o["sigma_grid"] != "scheduler":
            raise ValueError(f"sigmas, sigma_grid: expected one of them (sigmas replace the grid), got sigmas and "
                             f"sigma_grid={o['sigma_grid']!r}")
        if o["sigmas"] is not None:
            sig = o["sigmas"]
            if isinstance(sig, torch.Tensor):
                sig = sig.detach().cpu().double().reshape(-1).tolist()
            try:
                sig = tuple(float(v) for v in sig)
            except (TypeError, ValueError):
                raise ValueError(f"sigmas: expected a sequence of numbers (one per step), got {o['sigmas']!r}") from None
            if len(sig) != steps:
                raise ValueError(f"sigmas: expected {steps} values (one per step; the final 0 is appended), "
                                 f"got {len(sig)}")
            if not all(math.isfinite(v) and 0 < v <= 1 for v in sig):
                raise ValueError(f"sigmas: expected values in (0, 1], got {list(sig)}")
            if any(b >= a for a, b in zip(sig, sig[1:])):
                raise ValueError(f"sigmas: expected strictly decreasing values (noise to data), got {list(sig)}")
            o["sigmas"] = sig  # hashable, for signature()
        self.alphas_cumprod = None
        self.sigmas = self._flow_sigmas(steps)  # float32 values (as float64), N + 1 with the final 0
        if not np.all(np.isfinite(self.sigmas)) or np.any(np.diff(self.sigmas) >= 0):
            raise ValueError(f"sigmas: the shifted sigmas must decrease strictly to 0, got {self.sigmas.tolist()} "
                             "(check shift / mu)")

    # ---- sigmas exactly as diffusers computes them (dtype by dtype: float32 where diffusers is float32) ----

    def _shifted(self, s: np.ndarray) -> np.ndarray:
        """diffusers' shift of ``s``, in ``s``'s dtype (float64 for the default grid, float32 for user sigmas)."""
        o = self.options
        if o["use_dynamic_shifting"]:
            e = math.exp(self.mu) if o["time_shift_type"] == "exponential" else self.mu
            with np.errstate(divide="ignore"):
                return e / (e + (1 / s - 1) ** 1.0)
        return o["shift"] * s / (1 + (o["shift"] - 1) * s)

    def _train_sigma_range(self) -> tuple[float, float]:
        """diffusers' ``sigma_max``, ``sigma_min`` of the training grid (shifted unless dynamic), float32."""
        o = self.options
        T = o["num_train_timesteps"]
        ts = torch.from_numpy(np.linspace(1, T, T, dtype=np.float32)[::-1].copy())
        sig = ts / T
        if not o["use_dynamic_shifting"]:
            sig = o["shift"] * sig / (1 + (o["shift"] - 1) * sig)
        return sig[0].item(), sig[-1].item()

    def _flow_sigmas(self, N: int) -> np.ndarray:
        """FlowMatchEulerDiscreteScheduler.set_timesteps: N sigmas and a final 0 (float32 values, as float64)."""
        o = self.options
        T = o["num_train_timesteps"]
        if o["sigmas"] is not None:
            s = np.array(o["sigmas"]).astype(np.float32)
        elif o["sigma_grid"] == "flux":  # FluxPipeline's sigmas: BFL's linspace(1, 0, N + 1) less its final 0
            s = np.linspace(1.0, 1.0 / N, N).astype(np.float32)
        else:
            smax, smin = self._train_sigma_range()
            s = np.linspace(smax * T, smin * T, N) / T
        s = np.asarray(self._shifted(s)).astype(np.float32)
        return np.concatenate([s, np.zeros(1, np.float32)]).astype(np.float64)

    def _t(self, sig: np.ndarray) -> np.ndarray:
        """The model's timestep: float32(sigma) * T in float32, as diffusers' ``timesteps``."""
        T = self.options["num_train_timesteps"]
        return (sig.astype(np.float32) * np.float32(T)).astype(np.float64)

    @property
    def sigma_schedule(self) -> torch.Tensor:
        """The N + 1 sigmas of the trajectory (the last 0), float64 (float32 values)."""
        return torch.from_numpy(self.sigmas.copy())


class FlowEuler(FlowSolver):
    """Euler on the flow ODE: diffusers' ``FlowMatchEulerDiscreteScheduler`` (deterministic; ``shift``,
    dynamic shifting, custom ``sigmas``): x += (sigma_{k+1} - sigma_k) v."""

    name = "flow_euler"
    COLUMNS = ("dt",)

    def _build(self, N):
        sig = self.sigmas
        return dict(t=self._t(sig[:N]), dt=sig[1:] - sig[:N])

    def update(self, st, row, eps, var):
        st.x.add_(self.c(row, "dt") * eps)


class FlowHeun(FlowSolver):
    """Heun (2nd order) on the flow ODE: diffusers' ``FlowMatchHeunDiscreteScheduler`` (no churn). 2 * steps - 1
    model calls: even calls take the Euler step and save (x, v); odd calls, evaluated at the step's end, correct
    it with the mean velocity; the last step (to sigma 0) is Euler's. The model sees diffusers' repeated
    timesteps [t0, t1, t1, t2, t2, ...]. diffusers' Heun takes only ``shift``; dynamic shifting and custom sigmas
    here build the sigmas as ``FlowMatchEulerDiscreteScheduler`` does."""

    name = "flow_heun"
    COLUMNS = ("dt", "first")
    AUX = ("xs", "d")

    def _build(self, N):
        sig = self.sigmas
        k = np.arange(2 * N - 1)
        step, at = k // 2, (k + 1) // 2
        return dict(t=self._t(sig[at]), dt=sig[step + 1] - sig[step], first=(k % 2 == 0).astype(np.float64))

    update = Heun.update


class FlowDPMSolverPP(FlowSolver):
    """Multistep DPM-Solver++ (2M) on flow sigmas: diffusers' ``DPMSolverMultistepScheduler(use_flow_sigmas=True,
    prediction_type="flow_prediction", flow_shift=shift)`` (final sigma 0, midpoint). alpha = 1 - sigma,
    x0 = x - sigma v. As diffusers, the default grid is ``1 - linspace(1, 1/T, N + 1)`` shifted (its first sigma
    is shift(1 - 1/T) < 1), ``mu`` sets the shift to e^mu (``use_dynamic_shifting=True``), and the model sees
    **integer** timesteps int(sigma * T) (diffusers casts them to int64). Custom ``sigmas`` and
    ``sigma_grid="flux"`` are shifted as ``FlowMatchEulerDiscreteScheduler`` shifts them."""

    name = "flow_dpmsolver++"
    OPTIONS = dict(solver_order=2)
    COLUMNS = ("xa", "xs", "a", "b", "c")
    AUX = ("m1",)

    def _flow_sigmas(self, N):
        o = self.options
        T = o["num_train_timesteps"]
        if o["sigmas"] is not None or o["sigma_grid"] != "scheduler":
            sig = super()._flow_sigmas(N)
            self._t_sigmas = sig[:N]
            return sig
        s = 1.0 - np.linspace(1, 1 / T, N + 1)  # ascending, from 0
        if o["use_dynamic_shifting"] and o["time_shift_type"] == "linear":
            s = self._shifted(s)
        else:  # diffusers: flow_shift = exp(mu) with dynamic shifting, then the same formula
            k = math.exp(self.mu) if o["use_dynamic_shifting"] else o["shift"]
            s = k * s / (1 + (k - 1) * s)
        s = np.flip(s)[:-1].copy()  # descending, without the 0
        self._t_sigmas = s  # diffusers' timesteps come from these float64 values
        return np.concatenate([s, [0.0]]).astype(np.float32).astype(np.float64)

    def _build(self, N):
        o = self.options
        if o["solver_order"] not in (1, 2):
            raise ValueError(f"flow_dpmsolver++: solver_order: expected 1 or 2, got {o['solver_order']!r}")
        sig = self.sigmas
        T = o["num_train_timesteps"]
        ts = (self._t_sigmas * T).astype(np.int64).astype(np.float64)  # diffusers: sigmas * T, cast to int64
        alpha, sigma = 1 - sig, sig
        a, b, c = dpm2m_coefficients(alpha, sigma, N, o["solver_order"])
        return dict(t=ts, xa=np.ones(N), xs=sigma[:N], a=a, b=b, c=c)

    update = DPMSolverPP.update


SOLVERS: dict[str, type[Solver]] = {cls.name: cls for cls in (DDPM, DDIM, DPMSolverPP, Euler, Heun, FlowEuler,
                                                                 FlowHeun, FlowDPMSolverPP)}

#: The solvers for noise-predicting (epsilon) models and for velocity-predicting (flow-matching) models.
EPSILON_SOLVERS = tuple(k for k, c in SOLVERS.items() if c.prediction == "epsilon")
FLOW_SOLVERS = tuple(k for k, c in SOLVERS.items() if c.prediction == "flow")


def make_solver(sampler: str, steps: int, **options) -> Solver:
    """The solver named ``sampler`` (one of ``SOLVERS``) for ``steps`` steps; unknown names raise ``ValueError``."""
    if sampler not in SOLVERS:
        raise ValueError(f"sampler: expected one of {sorted(SOLVERS)}, got {sampler!r}")
    return SOLVERS[sampler](steps, **options)
