"""Weights & Biases tracking of a run, as one more CLU metric writer.

`hooks.Writers(wandb=True, ...)` adds a `WandbWriter` to the writers of process 0, so every
scalar, image grid and evaluation the run writes reaches the tracker without call sites of
its own. The tracker run:

- is named `wandb_name`, by default the workdir's name (`runs/x` -> `x`,
  `gs://b/diffuse_nnx/003_x` -> `003_x`);
- has the id `run_id(name)`, the SHA-256 of the name modulo 10^8 (as diffuse_nnx derives
  it), and is opened with `resume='allow'`, so a resumed run continues the same tracker run;
- gets the run's effective values (`WORKDIR/effective.json`: every argument of every node,
  defaults included, `{path: value}`) as its config;
- plots every metric against the training step (the `step` field; W&B's own step counter
  refuses steps that go back, which a run resumed from its last checkpoint repeats).

`WANDB_MODE=offline` writes the run under `WORKDIR/wandb/` (for a bucket workdir, under
`WANDB_DIR`, default the working directory: W&B writes local files) for a later
`wandb sync`; online mode needs an API key, which `check` looks for before training starts.
"""

import hashlib
import json
import netrc
import os
import urllib.parse

import numpy as np

from lib import errors, paths

OFFLINE_MODES = ('offline', 'dryrun', 'disabled')


def run_id(name: str) -> str:
  """The tracker run id of a run name: sha256(name) mod 10^8, as 8 decimal digits."""
  return f'{int(hashlib.sha256(name.encode("utf-8")).hexdigest(), 16) % 10**8:08d}'


def check_credentials() -> None:
  """Raises UserError when W&B is online (WANDB_MODE is not offline/disabled) and no API key
  is configured: WANDB_API_KEY, WANDB_IDENTITY_TOKEN_FILE, or the `wandb login` entry for
  the W&B host (WANDB_BASE_URL, default api.wandb.ai) in ~/.netrc (or $NETRC)."""
  if os.environ.get('WANDB_MODE', 'online').lower() in OFFLINE_MODES:
    return
  if os.environ.get('WANDB_API_KEY') or os.environ.get('WANDB_IDENTITY_TOKEN_FILE'):
    return
  host = urllib.parse.urlparse(os.environ.get('WANDB_BASE_URL', 'https://api.wandb.ai')).hostname
  try:
    if netrc.netrc(os.environ.get('NETRC')).authenticators(host):
      return
  except (FileNotFoundError, netrc.NetrcParseError):
    pass
  raise errors.UserError(
      'writers.wandb=True needs a Weights & Biases API key: set WANDB_API_KEY (or run '
      f'`wandb login`, which stores it in ~/.netrc for {host}), or set WANDB_MODE=offline to '
      'write the tracker run locally for a later `wandb sync`')


def _run_config(workdir: paths.Path) -> dict:
  """`{path: value text}` of the run's effective values, if it saved them."""
  from lib.config import saved

  file = workdir / saved.EFFECTIVE
  if not file.exists():
    return {}
  return {path: entry['value'] for path, entry in json.loads(file.read_text()).items()}


def writer(workdir, project: str, entity: str | None, name: str | None):
  """A CLU MetricWriter logging to a W&B run of `workdir` (see the module docstring)."""
  import wandb
  from clu.metric_writers import interface

  folder = paths.resolve(workdir, '--workdir')
  name = name or folder.name
  local_dir = None if paths.is_url(folder) else os.fspath(folder)
  try:
    run = wandb.init(project=project, entity=entity, name=name, id=run_id(name),
                     resume='allow', dir=local_dir, config=_run_config(folder))
  except wandb.Error as error:
    raise errors.UserError(f'writers.wandb: W&B could not open the run {name!r} of project '
                           f'{project!r}: {error}') from None
  run.define_metric('step', hidden=True)
  run.define_metric('*', step_metric='step')

  class WandbWriter(interface.MetricWriter):

    def write_scalars(self, step, scalars):
      run.log({**{k: float(np.asarray(v)) for k, v in scalars.items()}, 'step': int(step)})

    def write_images(self, step, images):
      run.log({**{k: [wandb.Image(image) for image in np.asarray(v)] for k, v in
                  images.items()}, 'step': int(step)})

    def write_texts(self, step, texts):
      run.log({**{k: wandb.Html(f'<pre>{v}</pre>') for k, v in texts.items()},
               'step': int(step)})

    def write_histograms(self, step, arrays, num_buckets=None):
      run.log({**{k: wandb.Histogram(np.asarray(v), num_bins=(num_buckets or {}).get(k, 64))
                  for k, v in arrays.items()}, 'step': int(step)})

    def write_summaries(self, step, values, metadata=None):
      self.write_scalars(step, {k: v for k, v in values.items() if np.ndim(v) == 0})

    def write_hparams(self, hparams):
      run.config.update(dict(hparams), allow_val_change=True)

    def _ignore(self, *args, **kwargs):
      """Nothing in fiddlediff writes videos or sounds."""

    write_videos = write_audios = _ignore

    def flush(self):
      """W&B streams each logged row itself."""

    def close(self):
      run.finish()

  return WandbWriter()
