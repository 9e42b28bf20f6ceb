"""python run.py --config=experiments/configs/easgd_cifar10.py --workdir=runs/easgd_cifar10

The CIFAR-10 setup of Zhang, Choromanska & LeCun, "Deep learning with Elastic Averaging SGD"
(NeurIPS 2015), Section 5: asynchronous EASGD, p workers each exchanging with the master's center
on its every tau-th own step, minibatch 128, beta = p * alpha = 0.9. EAMSGD, the same with
Nesterov momentum delta = 0.99, is eamsgd_cifar10.py.

The paper's grid is tau in {1, 4, 16, 64} x p in {4, 8, 16}; this file's default is tau = 4,
p = 4. Sweep it from the command line, one run per point, e.g.

  python run.py --config=experiments/configs/easgd_cifar10.py --config.tau=16 \
      --config.num_devices=8 --workdir=runs/easgd_cifar10_tau16_p8
  for p in 4 8 16; do for tau in 1 4 16 64; do
    python run.py --config=experiments/configs/easgd_cifar10.py --config.tau=$tau \
        --config.num_devices=$p --workdir=runs/easgd_cifar10_tau${tau}_p$p; done; done

alpha follows p: it is an ml_collections FieldReference computed from num_devices, so
`--config.num_devices=8` also sets alpha = 0.9 / 8 (as does the flat flag --num_devices=8, which
run.py applies with the same rule); an explicit `--config.alpha=...` or `--alpha=...` pins it.

CIFAR-10 is read with tfds.data_source and must be prepared once, with TensorFlow and internet
(run.py's error message says how); point --config.data_dir (or --data_dir) at it. cifar_cnn is
this repository's small AlexNet-style CNN (easgd_jax/models.py), not the paper's exact network,
and the paper tunes eta per method from a small grid: compare runs of these files with each
other, not with the paper's figures.
"""

import ml_collections

from experiments.configs.common import base_config

BETA = 0.9  # beta = p * alpha, the paper's choice for every p


def get_config():
  config = base_config()
  # async_easgd, not easgd: the paper's CIFAR runs are the asynchronous variant (its Algorithm
  # 1): each worker talks to the master whenever its own tau-th step comes, without waiting for
  # the others, first come first served. `easgd` here is the round-robin scheme, where worker
  # t mod p takes iteration t; the paper uses it for its stability analysis, not its experiments.
  config.algorithm = "async_easgd"
  config.dataset = "cifar10"
  config.model = "cifar_cnn"
  p = ml_collections.FieldReference(4)  # p in {4, 8, 16}
  config.num_devices = p
  config.alpha = BETA / p.to_float()  # alpha = beta / p, recomputed when num_devices changes
  config.tau = 4  # tau in {1, 4, 16, 64}
  config.batch_size = 128
  config.learning_rate = 0.05  # eta of the workers' SGD steps (0.05, 0.01, 0.005: tune here)
  config.steps = 100_000  # iterations of all workers together: 256 epochs of 50,000 samples
  config.eval_every = 1_000
  config.checkpoint_every = 5_000
  return config
