"""--engine=ray: the worker/master family and the data-parallel step-driven rules as Ray actors,
on one machine or across many.

An asynchronous rule runs as a parameter server actor and G worker actors (asynchronous.py);
Algorithm 1's order keeps the host scheduler on the driver, driving worker actors
(round_robin.py). Both run any worker/master rule: the actors (actors.py) receive the rule and
call its pure functions; they know no algorithm by name. A step-driven rule runs as G replica
actors, each worker a device or a mesh, whose reductions across replicas meet at a reducer
actor with a quorum per round (quorum.py, replicas.py). `cluster.py` joins a cluster or starts
an embedded one.
"""

from easgd_jax.algorithms.base import ROUND_ROBIN, STEP_DRIVEN
from easgd_jax.engines.ray.asynchronous import AsyncEngine
from easgd_jax.engines.ray.quorum import QuorumEngine
from easgd_jax.engines.ray.round_robin import IndexSampler, RoundRobinActors, RoundRobinEngine


def create(config, rule, dataset, params_host):
  if rule.kind == STEP_DRIVEN:
    return QuorumEngine(config, rule, dataset, params_host)
  if rule.schedule == ROUND_ROBIN:
    sampler = IndexSampler(dataset, seed=config.seed)  # Algorithm 1: the host draws
    return RoundRobinEngine(RoundRobinActors(config, rule, sampler, params_host))
  return AsyncEngine(config, rule, dataset, params_host)
