"""Shared by the config files in this folder (not a config itself: it has no get_config).

`base_config()` is a ConfigDict holding every field of `easgd_jax.config.Config` at its default,
so a config file sets only what its experiment changes, and every field can be overridden from
the command line (`--config.FIELD=VALUE`) whether or not the file mentions it. Fields whose
default is None are typed placeholders (ml_collections' `placeholder`): `--config.rho=0.5` then
parses as a float instead of being refused as an override of a None.
"""

import dataclasses
import types
import typing

import ml_collections
from ml_collections import config_dict

from easgd_jax.config import Config


def base_config() -> ml_collections.ConfigDict:
  """Config()'s defaults as a ConfigDict, the same values `python run.py` with no flags uses."""
  config = ml_collections.ConfigDict()
  for field in dataclasses.fields(Config):
    default = getattr(Config(), field.name)
    if default is None:
      config[field.name] = config_dict.placeholder(_type_of(field.type))
    else:
      config[field.name] = default
  return config


def _type_of(annotation):
  """float for `float | None`: the one non-None type of an optional field's annotation."""
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    (kind,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return kind
  return annotation
