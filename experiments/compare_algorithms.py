"""Every algorithm side by side: same data, model, sample budget, G = 4 workers, 3 seeds each.

  python experiments/compare_algorithms.py --workdir=runs/compare_algorithms
      # digits/lenet: 45 runs of 64,000 samples (the 39 before streaming_diloco and
      # async_diloco: 6.4 minutes on 2 CPU cores, measured)

  python experiments/compare_algorithms.py --workdir=runs/compare_mnist --dataset=mnist
      # the same study where mnist is prepared (see the README); --samples sets the budget

Writes results.md / results.csv (final accuracy mean ± std, steps / samples / seconds to the
target accuracy, samples/s, staleness) and accuracy_vs_samples.png / accuracy_vs_time.png into
the workdir; rerunning the command skips the runs that finished.
"""

from easgd_jax import study

G = 4  # workers (devices) for every parallel algorithm

ARMS = (
  study.Arm("sgd", {"algorithm": "sgd"}),
  study.Arm("sgd, model parallel M=4", {"algorithm": "sgd", "model_parallel": G}),
  study.Arm("sync_sgd", {"algorithm": "sync_sgd", "num_devices": G}),
  study.Arm("easgd (round-robin)", {"algorithm": "easgd", "num_devices": G}),
  study.Arm("eamsgd (round-robin)", {"algorithm": "easgd", "num_devices": G, "momentum": 0.9}),
  study.Arm("sync_easgd", {"algorithm": "sync_easgd", "num_devices": G}),
  study.Arm("local_sgd, tau=4", {"algorithm": "local_sgd", "num_devices": G, "tau": 4}),
  study.Arm(
    "diloco (adamw), tau=8",
    {"algorithm": "diloco", "num_devices": G, "tau": 8, "learning_rate": 0.002},
  ),
  study.Arm(
    "streaming_diloco (adamw), tau=8, 2 fragments",
    {"algorithm": "streaming_diloco", "num_devices": G, "tau": 8, "learning_rate": 0.002},
  ),
  study.Arm("async_sgd", {"algorithm": "async_sgd", "num_devices": G}),
  study.Arm("hogwild", {"algorithm": "hogwild", "num_devices": G}),
  study.Arm("async_easgd", {"algorithm": "async_easgd", "num_devices": G}),
  study.Arm("hogwild_easgd", {"algorithm": "hogwild_easgd", "num_devices": G}),
  study.Arm("downpour, tau=4", {"algorithm": "downpour", "num_devices": G, "tau": 4}),
  study.Arm(
    "async_diloco (adamw), tau=8",
    {"algorithm": "async_diloco", "num_devices": G, "tau": 8, "learning_rate": 0.002},
  ),
)


def make_study(base):
  return study.Study(name="compare_algorithms", arms=ARMS, base=base)


if __name__ == "__main__":
  study.main(make_study)
