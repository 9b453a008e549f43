"""scikit-learn digits, BN MLP (paper preset), full-batch two-rate gradient descent (batch_size=0)."""
import dataclasses

from rate_tuning.configs import digits


def get_config():
    return dataclasses.replace(digits.get_config(), batch_size=0, steps=300, eval_every=100, log_every=50)
