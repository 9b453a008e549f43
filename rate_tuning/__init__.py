"""Train BatchNorm networks the way Arora, Li & Lyu (ICLR 2019) analyse them.

Scale-invariant parameter groups (``'si'``) are trained with ``lr_w``, everything else (``'variant'``) with
``lr_g``; norms, effective learning rates and the gradient at the normalised point are tracked.
"""
from rate_tuning.groups import (FROZEN, SI, VARIANT, Label, LabelError, group_sq_norms, kinds, per_channel,
                                scale_groups, si, si_groups, verify_labels)
from rate_tuning.metrics import (angular_update, effective_lr, group_norms, intrinsic_grad_sq_norms,
                                 normalize)
from rate_tuning.models import PRESETS, batch_loss, build
from rate_tuning.optim import inverse_sqrt, project_si_groups, schedule, two_rate_sgd
from rate_tuning.sweep import SweepResult, bn_problem, grid, make_sweep, minibatch_fn, run_sweep
from rate_tuning.record import step_record, summarize
from rate_tuning.steps import TrainState, make_eval_step, make_train_step
from rate_tuning.train import create_train_state, train_and_evaluate

__version__ = "0.1.0"
