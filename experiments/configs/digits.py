"""python run.py --config=experiments/configs/digits.py --workdir=runs/digits

The default run, exactly what `python run.py` with no flags does (every field at Config()'s
default): round-robin EASGD (Algorithm 1), LeNet on the offline scikit-learn digits, G = 4
emulated devices, b = 32, eta = 0.05, rho = 1 (alpha = eta * rho = 0.05), tau = 1, 2,000 steps;
about 30 s on 2 CPU cores and ~0.97 test accuracy (README, "Set up and run").
"""

from experiments.configs.common import base_config


def get_config():
  return base_config()
