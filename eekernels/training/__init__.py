"""ASE fine-tuning: the diffusion loss on the truncated network, and a trainer with exact resume."""
from eekernels.training.loss import DiffusionTables, diffusion_loss, loss_weights, vb_term
from eekernels.training.trainer import TRAINABLE, TrainConfig, Trainer, model_kwargs, trainable_parameters

__all__ = ["DiffusionTables", "diffusion_loss", "loss_weights", "vb_term",
           "TRAINABLE", "TrainConfig", "Trainer", "model_kwargs", "trainable_parameters"]
