"""Evaluation: the judge and the Fréchet distance, the fidelity runner, the throughput benchmark, the naive
early-exit baseline, the plain-torch baseline of each model, and the seeded inputs and image grids every
evaluation shares. Modules import on use (``from eekernels.eval import fidelity``)."""
