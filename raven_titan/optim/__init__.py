"""Optimizers (AdamW, Huginn's ELLISAdam), name-based parameter groups and LR schedules."""

from raven_titan.optim.ellis_adam import ELLISAdam
from raven_titan.optim.lr_scheduler import build_lr_scheduler, check_schedule, lr_factor
from raven_titan.optim.param_groups import build_optimizer, build_param_groups

__all__ = [
    "ELLISAdam",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
    "check_schedule",
    "lr_factor",
]
