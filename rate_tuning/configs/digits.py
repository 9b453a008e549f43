"""scikit-learn digits, BN MLP (paper preset), two-rate SGD, batch 128: >= 90% test accuracy in seconds on a CPU."""
from rate_tuning.configs import Config


def get_config() -> Config:
    return Config(
        dataset="digits",
        data_kwargs=dict(seed=0),
        arch="mlp",
        arch_kwargs=dict(widths=(64, 64)),
        preset="paper",
        lr_w=0.1,
        lr_g=0.1,
        schedule="constant",
        batch_size=128,
        steps=500,
        eval_every=100,
        log_every=50,
        seed=0,
    )
