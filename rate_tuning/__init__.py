"""Train BatchNorm networks the way Arora, Li & Lyu (ICLR 2019) analyse them.

Scale-invariant parameter groups (``'si'``) are trained with ``lr_w``, everything else (``'variant'``) with
``lr_g``; norms, effective learning rates and the gradient at the normalised point are tracked.

The names below are loaded on first use (PEP 562), so ``import rate_tuning.cli`` does not import JAX
before the command has installed its signal handlers.
"""
import importlib

_EXPORTS = {
    "rate_tuning.groups": ("FROZEN", "SI", "VARIANT", "Label", "LabelError", "group_sq_norms", "kinds",
                           "per_channel", "scale_groups", "si", "si_groups", "verify_labels"),
    "rate_tuning.metrics": ("angular_update", "effective_lr", "group_norms", "intrinsic_grad_sq_norms", "normalize"),
    "rate_tuning.models": ("PRESETS", "batch_loss", "build"),
    "rate_tuning.optim": ("inverse_sqrt", "project_si_groups", "schedule", "two_rate_sgd"),
    "rate_tuning.projected": ("adamp", "sgdp", "scale_by_adamp", "scale_by_sgdp"),
    "rate_tuning.sweep": ("SweepResult", "bn_problem", "grid", "make_sweep", "minibatch_fn", "run_sweep"),
    "rate_tuning.record": ("step_record", "summarize"),
    "rate_tuning.steps": ("TrainState", "make_eval_step", "make_train_step"),
    "rate_tuning.train": ("create_train_state", "train_and_evaluate"),
    "rate_tuning.audit": ("AuditResult", "audit_factory", "audit_target", "compare_labels"),
    "rate_tuning.targets": ("AuditError", "Target", "from_linen", "from_nnx", "load_factory", "nnx_labels"),
}
"""(``rate_tuning.audit.audit``, the audit of a model, keeps its module's name: ``from rate_tuning.audit import
audit``; the assertions are in ``rate_tuning.testing``.)"""
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__version__ = "0.1.0"
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'rate_tuning' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
