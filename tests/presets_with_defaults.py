"""Two presets for tests/config/test_review.py that differ only through a class default: the digits
demo sampled with Heun (guidance_scale defaults to 1) or with GuidedHeun (defaults to 4)."""

import inspect

import fiddle as fdl

from experiments import dit
from lib.flow import samplers


class GuidedHeun(samplers.Heun):
  """Heun whose guidance_scale defaults to 4; its other arguments are Heun's."""

  __signature__ = inspect.signature(samplers.Heun).replace(parameters=[
      p.replace(default=4.0) if p.name == 'guidance_scale' else p
      for p in inspect.signature(samplers.Heun).parameters.values()])

  def __init__(self, num_steps: int, guidance_scale: float = 4.0, **kwargs):
    super().__init__(num_steps, guidance_scale=guidance_scale, **kwargs)


def _digits(sampler_class) -> fdl.Config:
  config = dit.digits()
  config.sampler = fdl.Config(sampler_class, num_steps=16)
  return config


def heun() -> fdl.Config:
  return _digits(samplers.Heun)


def guided_heun() -> fdl.Config:
  return _digits(GuidedHeun)
