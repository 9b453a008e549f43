"""scikit-learn digits, BN MLP (paper preset), two-rate SGD, batch 128: >= 90% test accuracy in seconds on a CPU."""
from rate_tuning.configs import Config


def get_config() -> Config:
    return Config(dataset="digits", data_kwargs=dict(seed=0), arch_kwargs=dict(widths=(64, 64)), steps=500,
                  eval_every=100, log_every=50)
