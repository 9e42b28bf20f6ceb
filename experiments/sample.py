"""Print text a language-model run generates.

  python experiments/sample.py --workdir=runs/lm --length=500 --temperature=0.8 --seed=0
  python experiments/sample.py --workdir=runs/lm --prompt="ROMEO:"

The weights are the run's evaluated ones (the center, for the algorithms with one): its
params.npz once it finished, else (a run still training or stopped early) its newest readable
checkpoint, restored into the engine its config.json describes. One character at a time
(easgd_jax.transformer.generate): the last --context characters in, the next character drawn
from softmax(logits / temperature) (0: the most likely one). Exit 2 with one line for a workdir
that holds no language-model run or no weights.
"""

import dataclasses
import os
import sys
import zipfile

from absl import flags

from easgd_jax import checkpoints, cli, reporting, resume, text
from easgd_jax.config import Config
from easgd_jax.errors import ConfigError

flags.DEFINE_string("workdir", None, "A run's workdir (--model=transformer).")
flags.DEFINE_integer("length", 500, "Characters to generate.")
flags.DEFINE_float("temperature", 0.8, "Softmax temperature (0: always the most likely).")
flags.DEFINE_integer("seed", 0, "Seed of the sampling.")
flags.DEFINE_string("prompt", "\n", "Text to start from (characters of the corpus only).")
flags.mark_flag_as_required("workdir")
FLAGS = flags.FLAGS


def saved_run(workdir):
  """The Config of the language-model run in `workdir`, or ConfigError saying what is missing."""
  saved = resume.saved_config(workdir)  # ConfigError for a damaged config.json
  if saved is None:
    raise ConfigError(f"--workdir={workdir} holds no run (no {reporting.CONFIG})")
  if saved.get("model") != "transformer":
    raise ConfigError(
      f"--workdir={workdir} holds a --model={saved.get('model')} run, not a language model"
    )
  names = {field.name for field in dataclasses.fields(Config)}
  values = {name: value for name, value in saved.items() if name in names}
  values["synthetic_shape"] = tuple(values.get("synthetic_shape", ()))
  return Config(**values)


def weights(workdir):
  """(config, model, the run's evaluated weights): params.npz when it is at least as new as the
  newest checkpoint, else that checkpoint."""
  import jax
  import jax.numpy as jnp

  from easgd_jax import models, train

  config = saved_run(workdir)
  params_path = os.path.join(workdir, reporting.PARAMS)
  newest = max(checkpoints.saved_steps(workdir), default=0)
  model = models.from_config(config, len(text.vocabulary()))
  if os.path.exists(params_path) and resume.summary_step(workdir) >= newest:
    template = jax.eval_shape(
      model.init, jax.random.key(0), jnp.zeros((1, config.context), jnp.int32)
    )["params"]
    try:
      return config, model, reporting.load_params(params_path, like=template)
    except (OSError, ValueError, zipfile.BadZipFile) as error:
      raise ConfigError(f"{params_path} is damaged ({error}); move it away") from None
  if newest == 0:
    raise ConfigError(f"--workdir={workdir} has neither {reporting.PARAMS} nor a checkpoint yet")
  if config.engine == "ray":
    raise ConfigError(
      f"--workdir={workdir} is a Ray run still training: sample it once it has written "
      f"{reporting.PARAMS}"
    )
  from easgd_jax import devices, engines

  config = train.validate(dataclasses.replace(config, num_processes=1), workdir)
  devices.emulate_cpu_devices(engines.devices_to_emulate(config))  # as run.py does
  built = train.build(config)
  found = checkpoints.Checkpointer(workdir, config.keep_checkpoints).restore_latest(
    built.engine.checkpoint_arrays()
  )
  if found is None:
    raise ConfigError(f"--workdir={workdir} has no readable checkpoint to sample from")
  built.engine.restore(*found)
  return config, model, built.engine.final_params()


def check_flags():
  if FLAGS.length < 0:
    raise ConfigError(f"--length must be at least 0 (got {FLAGS.length})")
  if not FLAGS.temperature >= 0:  # also NaN
    raise ConfigError(f"--temperature must be at least 0 (got {FLAGS.temperature})")
  if not FLAGS.prompt:
    raise ConfigError("--prompt must hold at least one character (default: a newline)")
  unknown = sorted(set(FLAGS.prompt) - set(text.vocabulary()))
  if unknown:
    raise ConfigError(f"--prompt has characters the corpus lacks: {unknown}; leave them out")


def main(argv):
  if len(argv) > 1:
    cli.exit_bad_input(f"unexpected arguments {argv[1:]}: every setting is a --flag")

  def sample():
    check_flags()
    import jax

    from easgd_jax import transformer

    _, model, params = weights(FLAGS.workdir)
    key = jax.random.key(FLAGS.seed)
    prompt = text.encode(FLAGS.prompt)
    return text.decode(
      transformer.generate(model, params, prompt, FLAGS.length, FLAGS.temperature, key)
    )

  print(cli.run(sample))
  sys.stdout.flush()


if __name__ == "__main__":
  cli.start(main)
