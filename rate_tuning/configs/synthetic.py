"""Tiny Gaussian-mixture problem and a one-hidden-layer BN MLP: seconds on a CPU; for tests and smoke runs."""
from rate_tuning.configs import Config


def get_config() -> Config:
    return Config(data_kwargs=dict(n_train=256, n_test=128, dim=16, num_classes=4, seed=0),
                  arch_kwargs=dict(widths=(16,)), batch_size=32, steps=60, eval_every=30, log_every=20)
