"""Fashion-MNIST (Debian dataset-fashion-mnist), BN MLP 784-256-256 (paper preset), two-rate SGD: minutes on a CPU."""
from rate_tuning.configs import Config


def get_config() -> Config:
    return Config(dataset="fashion_mnist", arch_kwargs=dict(widths=(256, 256)), steps=10000, eval_every=1000)
