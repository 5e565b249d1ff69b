"""ASE fine-tuning: the diffusion (or flow-matching) loss on the truncated network, self-distillation, and a
trainer with exact resume."""
from eekernels.training.loss import (DiffusionTables, diffusion_loss, distill_term, flow_loss, flow_weights,
                                     loss_weights, sample_sigmas, shift_sigmas, vb_term)
from eekernels.training.trainer import (TRAINABLE, TrainConfig, Trainer, frozen_prefixes, model_kwargs,
                                        trainable_parameters)

__all__ = ["DiffusionTables", "diffusion_loss", "distill_term", "flow_loss", "flow_weights", "loss_weights",
           "sample_sigmas", "shift_sigmas", "vb_term", "TRAINABLE", "TrainConfig", "Trainer", "frozen_prefixes",
           "model_kwargs", "trainable_parameters"]
