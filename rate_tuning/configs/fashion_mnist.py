"""Fashion-MNIST (Debian dataset-fashion-mnist), BN MLP 784-256-256 (paper preset), two-rate SGD: minutes on a CPU."""
from rate_tuning.configs import Config


def get_config() -> Config:
    return Config(
        dataset="fashion_mnist",
        data_kwargs=dict(path=None),
        arch="mlp",
        arch_kwargs=dict(widths=(256, 256)),
        preset="paper",
        lr_w=0.1,
        lr_g=0.1,
        schedule="constant",
        batch_size=128,
        steps=10000,
        eval_every=1000,
        log_every=100,
        seed=0,
    )
