"""Number of workers G in {1, 2, 4, 8}: round-robin, synchronous and asynchronous EASGD.

  python experiments/sweep_workers.py --workdir=runs/sweep_workers
      # digits/lenet, 2 seeds: 24 runs, ~5 minutes on 2 CPU cores
      # (at the ~11-13 s a digits run measured for sweep_rho and compare_algorithms)

Same sample budget for every G, so the plots show what extra workers buy per sample; on
emulated CPU devices the seconds measure overhead, not speed-up (see BENCHMARKS.md).
Writes results.md / .csv, the accuracy plots and sweep.png.
"""

from easgd_jax import study

WORKERS = (1, 2, 4, 8)


def make_study(base):
  arms = [
    study.Arm(
      f"{algorithm} G={g}", {"algorithm": algorithm, "num_devices": g}, family=algorithm, swept=g
    )
    for algorithm in ("easgd", "sync_easgd", "async_easgd")
    for g in WORKERS
  ]
  return study.Study(
    name="sweep_workers", arms=tuple(arms), base=base, seeds=(0, 1), sweep_name="workers G"
  )


if __name__ == "__main__":
  study.main(make_study)
