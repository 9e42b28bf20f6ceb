"""python run.py --config=experiments/configs/eamsgd_cifar10.py --workdir=runs/eamsgd_cifar10

Asynchronous EAMSGD on CIFAR-10 (Zhang et al. 2015, Section 5): easgd_cifar10.py with each
worker's local steps taken by Nesterov momentum, delta = 0.99 (the inner optimizer is then
`nesterov`, Algorithm 2 of the paper). Everything else, the tau x p grid, alpha = 0.9 / p
following --config.num_devices, and how to sweep, is as in easgd_cifar10.py, e.g.

  python run.py --config=experiments/configs/eamsgd_cifar10.py --config.tau=16 \
      --config.num_devices=8 --workdir=runs/eamsgd_cifar10_tau16_p8
"""

from experiments.configs import easgd_cifar10


def get_config():
  config = easgd_cifar10.get_config()
  config.momentum = 0.99  # delta
  # With delta = 0.99 a step moves about eta / (1 - delta) = 100 eta along a steady gradient, so
  # eta is 10x lower than easgd_cifar10.py's (the paper tunes it per method; tune it here).
  config.learning_rate = 0.005
  return config
