"""extract_latents: a tiny image tree through a tiny random SD-VAE into a LatentFolder that
loads, with the posterior of each crop, flipped copies, resumption and the command line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lib.config import REPO_ROOT
from lib.data import extract_latents
from lib.data.images import ImageFolder
from lib.data.latents import LatentFolder
from lib.encoders import sd_vae
from tests.data.test_images import CLASSES, NUM_EXAMPLES, make_tree

# four levels (downsampling 8, as LatentFolder expects), tiny widths
TINY = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  from safetensors.torch import save_file

  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, sample_size=16,
      down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
      **TINY)
  with torch.no_grad():
    for parameter in vae.parameters():
      parameter.add_(0.05 * torch.randn_like(parameter))
  path = tmp_path_factory.mktemp('vae') / 'diffusion_pytorch_model.safetensors'
  save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
  return str(path)


def test_extracts_a_loadable_latent_folder(tmp_path, weights):
  make_tree(tmp_path / 'images')
  out = tmp_path / 'latents'
  vae = sd_vae.StabilityVAE(weights_path=weights, **TINY)
  path = extract_latents.extract(str(tmp_path / 'images'), str(out), 16, vae, batch_size=5,
                                 flip=True, num_classes=3)
  assert path == str(out / 'dataset.json')
  labels = json.loads((out / 'dataset.json').read_text())['labels']
  assert len(labels) == 2 * NUM_EXAMPLES
  assert labels[0] == ['00000/img00000000.npy', 0]
  assert [label for _, label in labels[:NUM_EXAMPLES]] == [0] * 3 + [1] * 4 + [2] * 5
  assert [label for _, label in labels[NUM_EXAMPLES:]] == [label for _, label in
                                                            labels[:NUM_EXAMPLES]]

  folder = LatentFolder(str(out), image_size=16, batch_size=4, num_classes=3)
  folder.check()
  batch = next(folder.batches())
  assert batch['image'].shape == (4, 2, 2, 8) and batch['image'].dtype == np.float32

  # file i holds [mean, std] of crop i; file N + i of its mirror image
  images = ImageFolder(str(tmp_path / 'images'), image_size=16, num_classes=3)
  state = vae.load()
  pixels = images.load([0, 7, 7], [False, False, True])
  mean, logvar = vae.model(state).posterior(pixels.astype(np.float32) / 127.5 - 1.0)
  want = np.concatenate([mean, np.exp(0.5 * logvar)], -1).transpose(0, 3, 1, 2)
  for k, index in enumerate([0, 7, NUM_EXAMPLES + 7]):
    got = np.load(out / extract_latents.file_name(index))
    assert got.shape == (8, 2, 2) and got.dtype == np.float32
    np.testing.assert_allclose(got, want[k], rtol=1e-5, atol=1e-5)
  assert (np.load(out / extract_latents.file_name(0))[4:] > 0).all()  # std

  # resumption: only missing files are written again
  os.remove(out / extract_latents.file_name(3))
  os.remove(out / 'dataset.json')
  before = os.path.getmtime(out / extract_latents.file_name(4))
  extract_latents.extract(str(tmp_path / 'images'), str(out), 16, vae, batch_size=5, flip=True,
                          num_classes=3)
  assert os.path.exists(out / extract_latents.file_name(3))
  assert os.path.getmtime(out / extract_latents.file_name(4)) == before
  assert json.loads((out / 'dataset.json').read_text())['labels'] == labels
  assert not [n for n in os.listdir(out / '00000') if n.endswith('.tmp')]


def test_other_processes_files_keep_the_folder_incomplete(tmp_path, weights):
  make_tree(tmp_path / 'images', classes=CLASSES[:1])
  vae = sd_vae.StabilityVAE(weights_path=weights, **TINY)
  out = tmp_path / 'latents'
  assert extract_latents.extract(str(tmp_path / 'images'), str(out), 16, vae, batch_size=2,
                                 num_classes=3, process_index=0, process_count=2) is None
  assert sorted(os.listdir(out / '00000')) == ['img00000000.npy', 'img00000002.npy']
  assert extract_latents.extract(str(tmp_path / 'images'), str(out), 16, vae, batch_size=2,
                                 num_classes=3, process_index=1, process_count=2)


@pytest.mark.slow
def test_command_line(tmp_path, weights):
  make_tree(tmp_path / 'images', classes=CLASSES[:1])
  result = subprocess.run(
      [sys.executable, '-m', 'lib.data.extract_latents', f'--data_dir={tmp_path / "images"}',
       f'--out_dir={tmp_path / "latents"}', '--image_size=16', f'--weights_path={weights}',
       '--block_out_channels=8,8,8,8', '--layers_per_block=1', '--norm_num_groups=4',
       '--num_classes=1', '--batch_size=3'],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'encoded 4 / 4' in result.stderr and 'wrote' in result.stderr
  LatentFolder(str(tmp_path / 'latents'), image_size=16, num_classes=1).check()
