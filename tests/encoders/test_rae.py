"""RAE: the NNX ViT-MAE decoder vs transformers' ViT-MAE decoder, `RAE.encode` vs
transformers' `Dinov2WithRegistersModel` and `RAE.decode` vs the RAE decode recipe in torch
(small random-weight configs, files written and read through `RAE.load`), the latent
normalisation and statistics files, and the importer / configuration errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib.encoders import rae as rae_encoder
from lib.models import dinov2, rae
from lib.weights import rae as rae_weights
from lib.weights.files import read_state_dict
from lib.weights.torch_layout import torch_shape

# A tiny RAE: DINOv2 of width 32 (2 blocks, 4 registers, a 5x5 stored position table) at
# resolution 56 (a 4x4 latent grid); decoder width 64, 2 layers, patch 8 -> 32x32 images.
LATENT, GRID, RESOLUTION, POS_GRID = 32, 4, 56, 5
DECODER = dict(hidden_size=64, num_layers=2, num_heads=4, mlp_dim=128, patch_size=8)
IMAGE = GRID * DECODER['patch_size']
BATCH = 2
# The HF v5 names of a ViT-MAE layer -> RAE's (transformers v4) names.
_RAE_NAMES = (('attention.q_proj', 'attention.attention.query'),
              ('attention.k_proj', 'attention.attention.key'),
              ('attention.v_proj', 'attention.attention.value'),
              ('attention.o_proj', 'attention.output.dense'),
              ('mlp.fc1', 'intermediate.dense'), ('mlp.fc2', 'output.dense'))


def _tolerance(reference: np.ndarray) -> float:
  return 1e-4 * max(1.0, float(np.abs(reference).max()))


def _randomise(model, seed: int, keep=()) -> None:
  """Every parameter random (LayerNorm scales around one) except names containing `keep`."""
  torch = pytest.importorskip('torch')
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      if any(part in name for part in keep):
        continue
      noise = torch.randn(parameter.shape, generator=generator)
      is_norm_scale = 'norm' in name and name.endswith('weight')
      parameter.copy_(1.0 + 0.2 * noise if is_norm_scale else 0.2 * noise)


@pytest.fixture(scope='module')
def mae():
  """(HF ViTMAEForPreTraining with a small random decoder, CLS input c, RAE CLS token).

  RAE's decoder prepends `trainable_cls_token` after `decoder_embed`; HF's embeds its first
  input token, so feeding HF c and setting trainable_cls_token = decoder_embed(c) makes the
  two networks compute the same thing."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  config = transformers.ViTMAEConfig(
      hidden_size=LATENT, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
      decoder_hidden_size=DECODER['hidden_size'], decoder_num_hidden_layers=DECODER['num_layers'],
      decoder_num_attention_heads=DECODER['num_heads'],
      decoder_intermediate_size=DECODER['mlp_dim'], patch_size=DECODER['patch_size'],
      image_size=IMAGE, num_channels=3)
  model = transformers.ViTMAEForPreTraining(config).eval()
  _randomise(model, seed=0, keep=('pos_embed', 'position_embeddings'))
  # transformers v5's `_init_weights` zeroes the decoder table of a fresh ViTMAEForPreTraining
  # (released files carry it); a bare ViTMAEDecoder builds the fixed sin-cos table.
  from transformers.models.vit_mae import modeling_vit_mae
  table = modeling_vit_mae.ViTMAEDecoder(config, GRID * GRID).decoder_pos_embed
  assert float(table.abs().max()) > 0.5
  with torch.no_grad():
    model.decoder.decoder_pos_embed.copy_(table)
  cls_input = torch.randn(1, 1, LATENT, generator=torch.Generator().manual_seed(1))
  with torch.no_grad():
    cls_token = model.decoder.decoder_embed(cls_input)
  return model, cls_input, cls_token


def _hf_state_dict(mae) -> dict:
  """The whole ViTMAEForPreTraining (transformers v5 names, `decoder.` prefix, `vit.*` too)."""
  model, _, cls_token = mae
  return {**model.state_dict(), 'decoder.trainable_cls_token': cls_token}


def _rae_state_dict(mae) -> dict:
  """What RAE's `GeneralDecoder.state_dict()` holds: RAE names, no prefix, no mask_token."""
  model, _, cls_token = mae
  return _rae_names(model.decoder, cls_token)


def _rae_names(hf_decoder, cls_token) -> dict:
  """An HF `ViTMAEDecoder`'s state dict renamed to RAE's `GeneralDecoder`."""
  out = {'trainable_cls_token': cls_token}
  for key, value in hf_decoder.state_dict().items():
    if key == 'mask_token':
      continue
    for new, old in _RAE_NAMES:
      key = key.replace(f'.{new}.', f'.{old}.')
    out[key] = value
  return out


def _abstract_decoder():
  return nnx.split(nnx.eval_shape(lambda: rae.ViTMAEDecoder(
      LATENT, **DECODER, grid_size=GRID, rngs=nnx.Rngs(0))))


def _hf_decode(mae, tokens: np.ndarray) -> np.ndarray:
  """HF decoder logits (B, N, P*P*3) for latent tokens (B, N, LATENT), nothing masked."""
  import torch
  model, cls_input, _ = mae
  x = torch.from_numpy(tokens)
  hidden = torch.cat([cls_input.expand(x.shape[0], -1, -1), x], dim=1)
  ids_restore = torch.arange(x.shape[1]).expand(x.shape[0], -1)
  with torch.no_grad():
    return model.decoder(hidden, ids_restore).logits


@pytest.mark.parametrize('names', ['rae', 'hf_pretraining'])
def test_decoder_matches_transformers(mae, tmp_path, names):
  import torch
  model = mae[0]
  state_dict = _rae_state_dict(mae) if names == 'rae' else _hf_state_dict(mae)
  path = tmp_path / 'decoder.pt'
  torch.save(state_dict, path)
  graphdef, abstract = _abstract_decoder()
  decoder = nnx.merge(graphdef, rae_weights.import_decoder_state_dict(read_state_dict(str(path)),
                                                              abstract))
  np.testing.assert_allclose(decoder.decoder_pos_embed[...],
                             model.decoder.decoder_pos_embed.numpy(), atol=1e-6)

  z = np.random.default_rng(0).normal(size=(BATCH, GRID, GRID, LATENT)).astype(np.float32)
  tokens = z.reshape(BATCH, GRID * GRID, LATENT)  # row-major, as RAE's CHW .view(b, c, n).T
  want = _hf_decode(mae, tokens)
  got = jax.jit(lambda t: decoder.patch_logits(t))(tokens)
  np.testing.assert_allclose(got, want.numpy(), atol=_tolerance(want.numpy()), rtol=0)

  want_image = model.unpatchify(want, (IMAGE, IMAGE)).numpy().transpose(0, 2, 3, 1)
  image = jax.jit(lambda z: decoder(z))(z)
  assert image.shape == (BATCH, IMAGE, IMAGE, 3)
  np.testing.assert_allclose(image, want_image, atol=_tolerance(want_image), rtol=0)


def test_default_decoder_is_the_released_architecture():
  """Defaults = RAE's ViT-XL decoder for DINOv2-B at 224: the importer expects exactly the
  keys and shapes of RAE's `GeneralDecoder` (HF decoder on the meta device, RAE names)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from transformers.models.vit_mae import modeling_vit_mae
  config = transformers.ViTMAEConfig(
      hidden_size=768, decoder_hidden_size=1152, decoder_num_hidden_layers=28,
      decoder_num_attention_heads=16, decoder_intermediate_size=4096, patch_size=16,
      image_size=256)
  with torch.device('meta'):
    hf = modeling_vit_mae.ViTMAEDecoder(config, num_patches=256)
  release = _rae_names(hf, torch.empty(1, 1, 1152))
  want = {k: tuple(v.shape) for k, v in release.items() if k != 'decoder_pos_embed'}

  _, abstract = nnx.split(nnx.eval_shape(lambda: rae.ViTMAEDecoder(rngs=nnx.Rngs(0))))
  got = {}
  for path, variable in nnx.to_flat_state(abstract):
    if isinstance(variable, nnx.Param):
      keys = rae_weights.file_keys(tuple(str(part) for part in path), 'rae')
      shape = torch_shape(str(path[-1]), variable.shape)
      got.update({key: (shape[0] // len(keys), *shape[1:]) for key in keys})
    else:
      assert variable.shape == tuple(hf.decoder_pos_embed.shape) == (1, 257, 1152)
  assert got == want


# ------------------------------------------------------------------------------------------
# The RAE encoder wrapper


@pytest.fixture(scope='module')
def dinov2_reference(tmp_path_factory):
  """(HF Dinov2WithRegistersModel, random weights, final LayerNorm affine set to identity as
  RAE's `Dinov2withNorm`; path of the file saved *before* that, with a random affine)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from safetensors.torch import save_file
  config = transformers.Dinov2WithRegistersConfig(
      hidden_size=LATENT, num_hidden_layers=2, num_attention_heads=4, patch_size=14,
      image_size=POS_GRID * 14, num_register_tokens=4, layer_norm_eps=1e-6)
  model = transformers.Dinov2WithRegistersModel(config).eval()
  _randomise(model, seed=2)
  path = tmp_path_factory.mktemp('dinov2') / 'model.safetensors'
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
  with torch.no_grad():
    model.layernorm.weight.fill_(1.0)
    model.layernorm.bias.zero_()
  return model, str(path)


@pytest.fixture
def tiny_dinov2(monkeypatch):
  monkeypatch.setitem(dinov2.SIZES, 'tiny', dict(hidden_size=LATENT, depth=2, num_heads=4,
                                                 pos_grid=POS_GRID))
  return 'tiny'


@pytest.fixture
def files(mae, dinov2_reference, tmp_path):
  """{encoder, decoder, stats} files of the tiny RAE; stats (C, g, g) CHW as released."""
  import torch
  rng = np.random.default_rng(3)
  stats = dict(mean=rng.normal(size=(LATENT, GRID, GRID)).astype(np.float32),
               var=rng.uniform(0.5, 2.0, (LATENT, GRID, GRID)).astype(np.float32))
  np.savez(tmp_path / 'stat.npz', **stats)
  torch.save(_rae_state_dict(mae), tmp_path / 'model.pt')
  return dict(encoder=dinov2_reference[1], decoder=str(tmp_path / 'model.pt'),
              stats=str(tmp_path / 'stat.npz'), **stats)


def _tiny_rae(files, size) -> rae_encoder.RAE:
  return rae_encoder.RAE(files['encoder'], files['decoder'], files['stats'], encoder_size=size,
                 encoder_resolution=RESOLUTION, decoder=DECODER)


def _images(seed: int = 4) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (BATCH, IMAGE, IMAGE, 3), dtype=np.uint8)


def test_encode_matches_transformers(files, dinov2_reference, tiny_dinov2):
  """RAE.encode: resize [0, 1] pixels to 224 (here 56), ImageNet-normalise, DINOv2 tokens 5:
  with the final LayerNorm unscaled, CHW grid, (z - mean) / sqrt(var + eps)."""
  import torch
  model = dinov2_reference[0]
  autoencoder = _tiny_rae(files, tiny_dinov2)
  assert autoencoder.latent_shape(IMAGE, 3) == (GRID, GRID, LATENT)
  state = autoencoder.load()
  images = _images()
  z = jax.jit(lambda s, x: autoencoder.encode(s, x, None))(state, images)

  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
  x = torch.nn.functional.interpolate(x, size=(RESOLUTION, RESOLUTION), mode='bicubic',
                                      align_corners=False)
  x = ((x - torch.tensor(dinov2.IMAGENET_MEAN).view(1, 3, 1, 1))
       / torch.tensor(dinov2.IMAGENET_STD).view(1, 3, 1, 1))
  with torch.no_grad():
    tokens = model(x).last_hidden_state[:, 5:]
  want = tokens.transpose(1, 2).reshape(BATCH, LATENT, GRID, GRID)
  want = (want - torch.from_numpy(files['mean'])) / torch.sqrt(
      torch.from_numpy(files['var']) + 1e-5)
  want = want.numpy().transpose(0, 2, 3, 1)
  assert z.shape == (BATCH, GRID, GRID, LATENT) and z.dtype == jnp.float32
  np.testing.assert_allclose(z, want, atol=_tolerance(want), rtol=0)


def test_decode_matches_rae_recipe(files, mae, tiny_dinov2):
  """RAE.decode: denormalise, decoder, x * std + mean, clamp(0, 1) * 255 truncated to uint8
  (RAE's sample_ddp.py); and decode(encode(x)) under jit."""
  import torch
  autoencoder = _tiny_rae(files, tiny_dinov2)
  state = autoencoder.load()
  z = np.random.default_rng(5).normal(size=(BATCH, GRID, GRID, LATENT)).astype(np.float32)
  got = np.asarray(jax.jit(autoencoder.decode)(state, z))

  raw = (torch.from_numpy(z.transpose(0, 3, 1, 2)) * torch.sqrt(torch.from_numpy(files['var'])
                                                                  + 1e-5)
         + torch.from_numpy(files['mean']))
  logits = _hf_decode(mae, raw.reshape(BATCH, LATENT, -1).transpose(1, 2).numpy())
  x = mae[0].unpatchify(logits, (IMAGE, IMAGE))
  x = (x * torch.tensor(dinov2.IMAGENET_STD).view(1, 3, 1, 1)
       + torch.tensor(dinov2.IMAGENET_MEAN).view(1, 3, 1, 1))
  want = x.clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
  assert got.shape == want.shape == (BATCH, IMAGE, IMAGE, 3) and got.dtype == np.uint8
  difference = np.abs(got.astype(int) - want.astype(int))
  assert difference.max() <= 1 and (difference == 0).mean() > 0.99  # rounding would fail this
  assert 0.05 < (want == 0).mean() + (want == 255).mean() < 0.9  # both clip ends and interior

  images = jax.jit(lambda s, x: autoencoder.decode(s, autoencoder.encode(s, x)))(state, _images())
  assert images.shape == (BATCH, IMAGE, IMAGE, 3) and images.dtype == jnp.uint8


# ------------------------------------------------------------------------------------------
# Normalisation and statistics files


def test_normalisation_round_trip():
  rng = np.random.default_rng(6)
  z = rng.normal(size=(3, GRID, GRID, LATENT)).astype(np.float32)
  mean = rng.normal(size=(GRID, GRID, LATENT)).astype(np.float32)
  var = rng.uniform(0.0, 2.0, (GRID, GRID, LATENT)).astype(np.float32)
  normalised = rae_encoder.normalize(z, mean, var, 1e-5)
  np.testing.assert_allclose(normalised, (z - mean) / np.sqrt(var + 1e-5), rtol=1e-6)
  np.testing.assert_allclose(rae_encoder.denormalize(normalised, mean, var, 1e-5), z, atol=1e-5)


def test_read_stats_release_layout(tmp_path):
  """The released `stat.pt`: {'mean': None, 'var': (C, g, g)} -> zero mean, var in HWC."""
  torch = pytest.importorskip('torch')
  var = torch.rand(LATENT, GRID, 3) + 0.1  # distinct h and w sides catch a wrong transpose
  torch.save({'mean': None, 'var': var}, tmp_path / 'stat.pt')
  with pytest.raises(ValueError, match=r'`var` has shape \(32, 4, 3\), expected \(32, 4, 4\)'):
    rae_encoder.read_stats(str(tmp_path / 'stat.pt'), LATENT, GRID)
  var = torch.rand(LATENT, GRID, GRID) + 0.1
  torch.save({'mean': None, 'var': var}, tmp_path / 'stat.pt')
  mean, got = rae_encoder.read_stats(str(tmp_path / 'stat.pt'), LATENT, GRID)
  np.testing.assert_array_equal(mean, np.zeros((GRID, GRID, LATENT)))
  np.testing.assert_array_equal(got, var.numpy().transpose(1, 2, 0))
  np.savez(tmp_path / 'bad.npz', mean=np.zeros((LATENT, GRID, GRID), np.float32))
  with pytest.raises(ValueError, match='no `var` entry'):
    rae_encoder.read_stats(str(tmp_path / 'bad.npz'), LATENT, GRID)


# ------------------------------------------------------------------------------------------
# Errors


def test_importer_names_bad_keys(mae):
  state_dict = {k: v.numpy() for k, v in _rae_state_dict(mae).items()}
  del state_dict['decoder_layers.1.attention.attention.key.bias']
  state_dict['decoder_pred.weight'] = state_dict['decoder_pred.weight'][:-1]
  state_dict['decoder_extra.weight'] = np.zeros(3, np.float32)
  _, abstract = _abstract_decoder()
  with pytest.raises(ValueError) as error:
    rae_weights.import_decoder_state_dict(state_dict, abstract)
  message = str(error.value)
  assert 'RAE / transformers v4 names' in message
  assert 'missing keys (1): decoder_layers.1.attention.attention.key.bias' in message
  assert 'unexpected keys (1): decoder_extra.weight' in message
  assert 'decoder_pred.weight: checkpoint (191, 64), network (192, 64)' in message


def test_importer_rejects_foreign_position_table(mae):
  state_dict = {k: v.numpy() for k, v in _rae_state_dict(mae).items()}
  state_dict['decoder_pos_embed'] = state_dict['decoder_pos_embed'][..., ::-1]
  with pytest.raises(ValueError, match='decoder_pos_embed of the file differs'):
    rae_weights.import_decoder_state_dict(state_dict, _abstract_decoder()[1])


def test_shapes_and_configuration_errors():
  autoencoder = rae_encoder.RAE()
  assert (autoencoder.downsample_factor, autoencoder.latent_channels) == (16, 768)
  assert autoencoder.latent_shape(256, 3) == (16, 16, 768)
  with pytest.raises(ValueError, match=r'data.image_size=512: this RAE decodes 256x256 images '
                     r'\(decoder patch_size 16 x latent grid 16 = encoder_resolution 224 / 14\)'):
    autoencoder.latent_shape(512, 3)
  with pytest.raises(ValueError, match='data.channels=1: RAE encodes RGB'):
    autoencoder.latent_shape(256, 1)
  assert rae_encoder.RAE(encoder_resolution=448, decoder=dict(patch_size=16)).latent_shape(
      512, 3) == (32, 32, 768)
  with pytest.raises(ValueError, match='unknown keys depth'):
    rae_encoder.RAE(decoder=dict(depth=2))


def test_load_errors(tmp_path):
  with pytest.raises(ValueError, match='encoder.encoder_weights is not set'):
    rae_encoder.RAE().load()
  (tmp_path / 'model.safetensors').write_bytes(b'')
  missing = str(tmp_path / 'missing.pt')
  with pytest.raises(FileNotFoundError, match=re.escape(
      f'encoder.decoder_weights={missing!r} does not exist; expected an RAE decoder state dict')):
    rae_encoder.RAE(str(tmp_path / 'model.safetensors'), missing).load()


def test_rae_preset_trains_and_draws_reconstructions(files, tiny_dinov2, tmp_path):
  """experiments/rae.py, shrunk: raw JPEGs -> tiny RAE latents (4x4x32) -> LightningDDT/1."""
  import json

  import fiddle as fdl
  from PIL import Image

  from experiments import common
  from lib import train
  from lib.config import presets

  rng = np.random.default_rng(5)
  for c in range(2):
    folder = tmp_path / 'images' / 'train' / f'n{c}'
    folder.mkdir(parents=True)
    for i in range(4):
      pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(folder / f'{i}.JPEG', quality=95)
  config = presets.load_preset('experiments/rae.py:s1')
  config.data = fdl.Config(common.images.ImageFolder, data_dir=str(tmp_path / 'images'),
                           image_size=IMAGE, batch_size=4, num_classes=2, num_parallel_reads=1)
  for name, value in dict(encoder_weights=files['encoder'], decoder_weights=files['decoder'],
                          stats_path=files['stats'], encoder_size=tiny_dinov2,
                          encoder_resolution=RESOLUTION, decoder=DECODER).items():
    setattr(config.encoder, name, value)
  for name, value in dict(encoder_hidden_size=32, encoder_num_heads=2, num_encoder_blocks=1,
                          decoder_hidden_size=48, decoder_num_heads=2,
                          num_decoder_blocks=1).items():
    setattr(config.network, name, value)
  config.sampler.num_steps = 2
  config.visualize.num_samples = 4
  config.visualize.guidance_scales = (1.0,)
  config.evaluate = []
  config.total_steps = 3
  config.log_every_steps = 1
  config.checkpoint.save_interval_steps = 3
  experiment = fdl.build(config)
  assert experiment.latent_shape == (GRID, GRID, LATENT)
  workdir = tmp_path / 'run'
  assert train.train(experiment, str(workdir)) == 3
  records = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  assert all(np.isfinite(r['train/loss']) for r in records if 'train/loss' in r)
  assert (workdir / 'samples' / 'step_00000001_reconstructions.png').exists()
  assert (workdir / 'samples' / 'step_00000003_cfg1.png').exists()  # the final grid
