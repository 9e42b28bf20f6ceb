"""Elastic coefficient rho: round-robin and synchronous EASGD, G = 4.

  python experiments/sweep_rho.py --workdir=runs/sweep_rho
      # digits/lenet, rho in {0.25, 1, 4, 16}, 2 seeds: 16 runs, ~3 minutes on 2 cores
      # (measured: with --seeds=0,1,2, 24 runs took 4.3 minutes)

With eta = 0.05 the moving rate alpha = eta * rho runs from 0.0125 to 0.8; rho = 16 puts
sync_easgd's alpha + beta = 4 above the stable bound 2 (the start-up warning says so) and the
run shows what that does. Writes results.md / .csv, the accuracy plots and sweep.png.
"""

from easgd_jax import study

RHOS = (0.25, 1.0, 4.0, 16.0)
G = 4


def make_study(base):
  arms = [
    study.Arm(
      f"{algorithm} rho={rho:g}",
      {"algorithm": algorithm, "num_devices": G, "rho": rho},
      family=algorithm,
      swept=rho,
    )
    for algorithm in ("easgd", "sync_easgd")
    for rho in RHOS
  ]
  return study.Study(name="sweep_rho", arms=tuple(arms), base=base, seeds=(0, 1), sweep_name="rho")


if __name__ == "__main__":
  study.main(make_study)
