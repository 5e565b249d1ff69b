"""ASE fine-tuning: the diffusion (or flow-matching) loss on the truncated network, self-distillation, a trainer
with exact resume, and fine-tuning through a whole sampling run (``rollout``, ``trajectory_loss``)."""
from eekernels.training.loss import (DiffusionTables, diffusion_loss, distill_term, flow_loss, flow_weights,
                                     loss_weights, sample_sigmas, shift_sigmas, vb_term)
from eekernels.training.trainer import (TRAINABLE, TrainConfig, Trainer, frozen_prefixes, model_kwargs,
                                        trainable_parameters)
from eekernels.training.trajectory import rollout, trajectory_loss

__all__ = ["DiffusionTables", "diffusion_loss", "distill_term", "flow_loss", "flow_weights", "loss_weights",
           "sample_sigmas", "shift_sigmas", "vb_term", "TRAINABLE", "TrainConfig", "Trainer", "frozen_prefixes",
           "model_kwargs", "trainable_parameters", "rollout", "trajectory_loss"]
