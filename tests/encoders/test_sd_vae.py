"""SD-VAE: NNX port vs diffusers `AutoencoderKL` on a small random-weight config, the EDM2
normalisation, and the weight-loading errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib.encoders import sd_vae
from lib.weights import sd_vae as sd_vae_weights
from lib.weights.torch_layout import torch_shape

SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)
RAW_MEAN = (0.5, -1.0, 0.25, 2.0)
RAW_STD = (4.0, 5.0, 3.0, 2.0)


def _tolerance(reference: np.ndarray) -> float:
  return 1e-4 * max(1.0, float(np.abs(reference).max()))


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """(torch AutoencoderKL with random weights, path of its .safetensors file)."""
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  from safetensors.torch import save_file

  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, sample_size=32,
      down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
      **SMALL).eval()
  with torch.no_grad():
    for name, parameter in vae.named_parameters():
      noise = torch.randn_like(parameter)
      is_norm_scale = 'norm' in name and name.endswith('weight')
      parameter.copy_(1.0 + 0.1 * noise if is_norm_scale else 0.1 * noise)
  path = tmp_path_factory.mktemp('vae') / 'diffusion_pytorch_model.safetensors'
  save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(path))
  return vae, str(path)


def _vae(path, **kwargs) -> sd_vae.StabilityVAE:
  return sd_vae.StabilityVAE(weights_path=path, raw_mean=RAW_MEAN, raw_std=RAW_STD, **SMALL,
                             **kwargs)


def test_matches_diffusers(reference):
  import torch
  torch_vae, path = reference
  vae = _vae(path)
  state = vae.load()
  model = vae.model(state)

  x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    posterior = torch_vae.encode(torch.from_numpy(x.transpose(0, 3, 1, 2))).latent_dist
  want_mean = posterior.mean.numpy().transpose(0, 2, 3, 1)
  want_logvar = posterior.logvar.numpy().transpose(0, 2, 3, 1)
  mean, logvar = jax.jit(lambda s, x: vae.model(s).posterior(x))(state, x)
  assert mean.shape == (2, 16, 16, 4)
  assert np.abs(want_mean).max() > 0.1 and np.abs(want_logvar).max() > 0.1
  np.testing.assert_allclose(mean, want_mean, rtol=0, atol=_tolerance(want_mean))
  np.testing.assert_allclose(logvar, want_logvar, rtol=0, atol=_tolerance(want_logvar))

  z = np.random.default_rng(1).normal(size=(2, 16, 16, 4)).astype(np.float32)
  with torch.no_grad():
    want = torch_vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample
  want = want.numpy().transpose(0, 2, 3, 1)
  got = model.decode(jnp.asarray(z))
  assert got.shape == (2, 32, 32, 3) and np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance(want))


def test_encode_decode_wrapper(reference):
  import torch
  torch_vae, path = reference
  vae = _vae(path, sample_posterior=False)
  state = vae.load()
  pixels = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
  with torch.no_grad():
    x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    mean = torch_vae.encode(x).latent_dist.mean
    decoded = torch_vae.decode(mean).sample.numpy().transpose(0, 2, 3, 1)
  mean = mean.numpy().transpose(0, 2, 3, 1)

  z = jax.jit(vae.encode)(state, pixels, None)
  want_z = (mean - np.array(RAW_MEAN)) / np.array(RAW_STD) * 0.5
  np.testing.assert_allclose(z, want_z, rtol=0, atol=1e-4)
  images = jax.jit(vae.decode)(state, z)
  want_images = np.clip(np.round((decoded + 1) * 127.5), 0, 255)
  assert images.dtype == jnp.uint8 and images.shape == (2, 32, 32, 3)
  assert np.abs(np.asarray(images, np.int32) - want_images).max() <= 1
  assert len(np.unique(want_images)) > 10


def test_bin_file_loads_the_same(reference, tmp_path):
  import torch
  torch_vae, path = reference
  bin_path = tmp_path / 'diffusion_pytorch_model.bin'
  torch.save(torch_vae.state_dict(), bin_path)
  from_bin = jax.tree.leaves(_vae(str(bin_path)).load())
  from_safetensors = jax.tree.leaves(_vae(path).load())
  assert len(from_bin) == len(from_safetensors) > 100
  for a, b in zip(from_bin, from_safetensors):
    np.testing.assert_array_equal(a, b)


def test_posterior_moments_normalisation_round_trip():
  vae = _vae(None, sample_posterior=False, final_mean=0.25, final_std=0.5)
  rng = np.random.default_rng(3)
  mean = rng.normal(size=(2, 4, 4, 4)).astype(np.float32) * 5
  std = np.abs(rng.normal(size=(2, 4, 4, 4))).astype(np.float32)
  moments = np.concatenate([mean, std], axis=-1)

  z = vae.encode({}, moments, None)
  want = (mean - np.array(RAW_MEAN)) / np.array(RAW_STD) * 0.5 + 0.25
  np.testing.assert_allclose(z, want, rtol=1e-6, atol=1e-6)
  scale, bias = vae._scale_bias()
  np.testing.assert_allclose((z - bias) / scale, mean, rtol=1e-5, atol=1e-5)

  sampled = _vae(None, final_mean=0.25, final_std=0.5).encode({}, moments, jax.random.key(0))
  eps = jax.random.normal(jax.random.key(0), mean.shape)
  np.testing.assert_allclose(sampled, ((mean + eps * std) - np.array(RAW_MEAN))
                             / np.array(RAW_STD) * 0.5 + 0.25, rtol=1e-5, atol=1e-5)
  assert not np.allclose(sampled, z)


def test_protocol_attributes():
  vae = sd_vae.StabilityVAE()
  assert vae.downsample_factor == 8 and vae.latent_channels == 4
  assert vae.latent_shape(256, 3) == (32, 32, 4)
  with pytest.raises(ValueError, match='data.image_size=100'):
    vae.latent_shape(100, 3)


def test_default_architecture_parameter_count():
  state = sd_vae.StabilityVAE().abstract_state()
  count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(state))
  assert count == 83_653_863


def test_missing_weights_path_error():
  with pytest.raises(ValueError, match=r'encoder\.weights_path.*diffusion_pytorch_model'):
    sd_vae.StabilityVAE().load()


def test_key_mismatch_error():
  vae = sd_vae.StabilityVAE(**SMALL)
  abstract = vae.abstract_state()
  from flax import nnx
  state_dict = {sd_vae_weights.diffusers_key(path): np.zeros(torch_shape(str(path[-1]), v.shape),
                                                             np.float32)
                for path, v in nnx.to_flat_state(abstract)}
  assert len(state_dict) == 124
  sd_vae_weights.import_diffusers_state_dict(state_dict, abstract)  # complete: no error

  del state_dict['encoder.mid_block.attentions.0.to_q.weight']
  state_dict['encoder.bogus.weight'] = np.zeros(3, np.float32)
  state_dict['quant_conv.weight'] = np.zeros((8, 8, 3, 3), np.float32)
  with pytest.raises(ValueError) as error:
    sd_vae_weights.import_diffusers_state_dict(state_dict, abstract)
  message = str(error.value)
  assert 'missing keys (1): encoder.mid_block.attentions.0.to_q.weight' in message
  assert 'unexpected keys (1): encoder.bogus.weight' in message
  assert 'quant_conv.weight: checkpoint (8, 8, 3, 3), network (8, 8, 1, 1)' in message


def test_legacy_attention_names_are_renamed():
  assert (sd_vae_weights._rename_legacy('decoder.mid_block.attentions.0.proj_attn.bias')
          == 'decoder.mid_block.attentions.0.to_out.0.bias')
  assert (sd_vae_weights._rename_legacy('encoder.mid_block.attentions.0.query.weight')
          == 'encoder.mid_block.attentions.0.to_q.weight')
