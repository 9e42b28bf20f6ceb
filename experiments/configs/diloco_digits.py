"""python run.py --config=experiments/configs/diloco_digits.py --workdir=runs/diloco_digits

DiLoCo (Douillard et al., 2023) on the offline digits: G = 4 workers each take tau = 10 AdamW
steps on their own shard of the training set, then the outer Nesterov SGD (lr 0.7, momentum 0.9,
the paper's values) steps the center along the averaged pseudo-gradient and every worker restarts
from it. A step is one inner step of all 4 workers at once (4 x 32 samples).

Measured on 2 idle CPU cores: test accuracy >= 0.95 from step ~200 on, 0.981 / 0.950 / 0.981 at
step 600 for seeds 0 / 1 / 2; 5 s of training, ~9 s with start-up and compilation.
"""

from experiments.configs.common import base_config


def get_config():
  config = base_config()
  config.algorithm = "diloco"
  config.dataset = "digits"
  config.model = "lenet"
  config.num_devices = 4
  config.batch_size = 32
  config.optimizer = "adamw"  # the inner optimizer (diloco's default, written out)
  config.learning_rate = 2e-3  # AdamW's eta
  config.weight_decay = 1e-4
  config.tau = 10  # inner steps per round (the paper uses hundreds; digits needs few)
  config.outer_learning_rate = 0.7
  config.outer_momentum = 0.9
  config.steps = 600  # 60 rounds
  config.eval_every = 50
  config.target_accuracy = 0.95
  return config
