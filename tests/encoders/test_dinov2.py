"""DINOv2: the NNX port vs transformers' `Dinov2Model` / `Dinov2WithRegistersModel` (PyTorch,
small random-weight configs, every parameter randomised), the torch-compatible bicubic
resampling, the HF v4 / v5 / torch-hub importers and their errors, and the `DINOv2` wrapper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lib.encoders import dinov2 as dinov2_encoder
from lib.models import dinov2
from lib.weights import dinov2 as dinov2_weights
from lib.weights.files import read_state_dict
from lib.weights.torch_layout import torch_shape

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
F = torch.nn.functional

HIDDEN, LAYERS, HEADS = 64, 2, 4
IMAGE = 56  # config image size: a 4x4 position grid


def _tolerance(reference: np.ndarray) -> float:
  return 1e-4 * max(1.0, float(np.abs(reference).max()))


def _hf_model(registers: int = 0, swiglu: bool = False, image_size: int = IMAGE, seed: int = 0):
  """A small transformers DINOv2 with every parameter (tokens, LayerScale, norms) random."""
  common = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                patch_size=14, image_size=image_size, use_swiglu_ffn=swiglu,
                layer_norm_eps=1e-6)
  if registers:
    config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
    model = transformers.Dinov2WithRegistersModel(config)
  else:
    model = transformers.Dinov2Model(transformers.Dinov2Config(**common))
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      noise = torch.randn(parameter.shape, generator=generator)
      if 'norm' in name and name.endswith('weight'):
        parameter.copy_(1.0 + 0.2 * noise)
      elif 'lambda1' in name:
        parameter.copy_(0.5 + 0.3 * noise)
      elif name.startswith('embeddings.') and 'projection' not in name:
        parameter.copy_(0.5 * noise)  # cls / mask / register tokens, position table
      else:
        parameter.copy_(0.2 * noise)
  return model.eval()


def _state_dict(model) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _nnx(registers: int = 0, swiglu: bool = False, pos_grid: int = IMAGE // 14, **kwargs):
  model = nnx.eval_shape(lambda: dinov2.DINOv2ViT(
      HIDDEN, LAYERS, HEADS, num_register_tokens=registers, swiglu=swiglu, pos_grid=pos_grid,
      rngs=nnx.Rngs(0), **kwargs))
  return nnx.split(model)


def _run_torch(model, images: np.ndarray, **kwargs):
  with torch.no_grad():
    return model(torch.from_numpy(images.transpose(0, 3, 1, 2)), **kwargs)


def _run_nnx(graphdef, state, images, **kwargs):
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, **kwargs))(state, images)


@pytest.fixture(scope='module')
def references():
  return {key: _hf_model(*key) for key in ((0, False), (4, False), (0, True))}


# ------------------------------------------------------------------------------------------
# Bicubic resampling


@pytest.mark.parametrize('antialias', [False, True])
@pytest.mark.parametrize('sizes', [(37, 16), (4, 2), (4, 5), (2, 4), (256, 224), (4, 4),
                                   ((4, 6), (3, 7))])
def test_resize_matches_torch(sizes, antialias):
  old, new = (s if isinstance(s, tuple) else (s, s) for s in sizes)
  x = np.random.default_rng(0).normal(size=(2, *old, 5)).astype(np.float32)
  want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=new, mode='bicubic',
                       align_corners=False, antialias=antialias).numpy().transpose(0, 2, 3, 1)
  got = dinov2.resize_bicubic(jnp.asarray(x), new, antialias=antialias)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize('grid', [16, 3, 40])
def test_hub_offset_pos_embed_matches_torch(grid):
  """torch-hub's `scale_factor=(g + 0.1) / 37` resample of a 37x37 table."""
  table = np.random.default_rng(1).normal(size=(1, 1 + 37 * 37, 8)).astype(np.float32)
  patch = torch.from_numpy(table[0, 1:].reshape(1, 37, 37, 8)).permute(0, 3, 1, 2)
  factor = (grid + 0.1) / 37
  want = F.interpolate(patch, scale_factor=(factor, factor), mode='bicubic')
  want = want.permute(0, 2, 3, 1).reshape(1, -1, 8).numpy()
  got = dinov2.resample_pos_embed(jnp.asarray(table), (grid, grid), offset=0.1)
  np.testing.assert_array_equal(got[:, :1], table[:, :1])
  np.testing.assert_allclose(got[:, 1:], want, rtol=0, atol=1e-5)
  size_variant = dinov2.resample_pos_embed(jnp.asarray(table), (grid, grid))
  assert np.abs(np.asarray(size_variant) - np.asarray(got)).max() > 1e-3  # the variants differ


# ------------------------------------------------------------------------------------------
# Equivalence with transformers


@pytest.mark.parametrize('key', [(0, False), (4, False), (0, True)],
                         ids=['plain', 'registers', 'swiglu'])
@pytest.mark.parametrize('shape', [(56, 56), (60, 60), (28, 28), (70, 70), (42, 84)],
                         ids=['native', 'remainder', 'down', 'up', 'nonsquare'])
def test_matches_transformers(references, key, shape):
  """Native grid (no interpolation) and other grids (HF v5 `interpolate_pos_encoding`:
  plain bicubic for Dinov2Model, antialiased for Dinov2WithRegistersModel)."""
  registers, swiglu = key
  reference = references[key]
  graphdef, abstract = _nnx(registers, swiglu)
  state = dinov2_weights.import_state_dict(_state_dict(reference), abstract)
  images = np.random.default_rng(2).normal(size=(2, *shape, 3)).astype(np.float32)
  want = _run_torch(reference, images)
  tokens = want.last_hidden_state.numpy()
  want_patches = tokens[:, 1 + registers:]

  patches, cls = _run_nnx(graphdef, state, images, return_cls=True)
  assert patches.shape == (2, (shape[0] // 14) * (shape[1] // 14), HIDDEN)
  assert np.abs(want_patches).max() > 0.5
  np.testing.assert_allclose(patches, want_patches, rtol=0, atol=_tolerance(want_patches))
  np.testing.assert_allclose(cls, want.pooler_output.numpy(), rtol=0, atol=_tolerance(tokens))
  full = jax.jit(lambda s, x: nnx.merge(graphdef, s).tokens(x))(state, images)
  np.testing.assert_allclose(full, tokens, rtol=0, atol=_tolerance(tokens))


def test_mask_tokens_match_transformers(references):
  reference = references[(4, False)]
  graphdef, abstract = _nnx(4)
  state = dinov2_weights.import_state_dict(_state_dict(reference), abstract)
  images = np.random.default_rng(3).normal(size=(2, 56, 56, 3)).astype(np.float32)
  mask = np.random.default_rng(4).uniform(size=(2, 16)) < 0.5
  want = _run_torch(reference, images, bool_masked_pos=torch.from_numpy(mask))
  want = want.last_hidden_state.numpy()[:, 5:]
  got = _run_nnx(graphdef, state, images, mask=mask)
  np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance(want))


def test_final_norm_without_affine_matches_rae(references):
  """RAE removes the final LayerNorm's affine: equal to HF with weight 1 and bias 0."""
  reference = _hf_model(4, seed=5)
  state_dict = _state_dict(reference)
  with torch.no_grad():
    reference.layernorm.weight.fill_(1.0)
    reference.layernorm.bias.zero_()
  graphdef, abstract = _nnx(4, final_norm_affine=False)
  assert 'norm' not in abstract  # no parameters left
  state = dinov2_weights.import_state_dict(state_dict, abstract, final_norm_affine=False)
  images = np.random.default_rng(6).normal(size=(2, 42, 42, 3)).astype(np.float32)
  want = _run_torch(reference, images).last_hidden_state.numpy()[:, 5:]
  np.testing.assert_allclose(_run_nnx(graphdef, state, images), want, rtol=0,
                             atol=_tolerance(want))


# ------------------------------------------------------------------------------------------
# Importers


def _v4_names(state_dict: dict) -> dict:
  """transformers v5 keys -> the v4 names of the released HF files (test-side rename)."""
  out = {}
  for key, value in state_dict.items():
    if '.mlp.up_proj.' in key:
      continue
    for v5, v4 in (('attention.q_proj', 'attention.attention.query'),
                   ('attention.k_proj', 'attention.attention.key'),
                   ('attention.v_proj', 'attention.attention.value'),
                   ('attention.o_proj', 'attention.output.dense'),
                   ('mlp.down_proj', 'mlp.weights_out')):
      key = key.replace(v5, v4)
    if '.mlp.gate_proj.' in key:
      value = np.concatenate([value, state_dict[key.replace('gate_proj', 'up_proj')]], axis=0)
      key = key.replace('gate_proj', 'weights_in')
    out[key] = value
  return out


def _hub_names(state_dict: dict) -> dict:
  """transformers v5 keys -> torch-hub (facebookresearch/dinov2) keys (test-side rename)."""
  out = {}
  simple = {'embeddings.cls_token': 'cls_token', 'embeddings.mask_token': 'mask_token',
            'embeddings.register_tokens': 'register_tokens',
            'embeddings.position_embeddings': 'pos_embed'}
  for key, value in state_dict.items():
    if key in simple:
      out[simple[key]] = value
    elif key.startswith('embeddings.patch_embeddings.projection.'):
      out['patch_embed.proj.' + key.rsplit('.', 1)[1]] = value
    elif key.startswith('layernorm.'):
      out['norm.' + key.rsplit('.', 1)[1]] = value
    else:
      _, _, index, rest = key.split('.', 3)
      prefix, leaf = f'blocks.{index}.', rest.rsplit('.', 1)[1]
      if rest.startswith('attention.q_proj'):
        parts = [state_dict[key.replace('q_proj', name)] for name in ('q_proj', 'k_proj', 'v_proj')]
        out[prefix + 'attn.qkv.' + leaf] = np.concatenate(parts, axis=0)
      elif rest.startswith('mlp.gate_proj'):
        parts = [state_dict[key.replace('gate_proj', name)] for name in ('gate_proj', 'up_proj')]
        out[prefix + 'mlp.w12.' + leaf] = np.concatenate(parts, axis=0)
      elif rest.startswith(('attention.k_proj', 'attention.v_proj', 'mlp.up_proj')):
        continue
      else:
        renamed = {'attention.o_proj': 'attn.proj', 'layer_scale1.lambda1': 'ls1.gamma',
                   'layer_scale2.lambda1': 'ls2.gamma', 'mlp.down_proj': 'mlp.w3'}
        module = rest.rsplit('.', 1)[0]
        out[prefix + (renamed[rest] if rest in renamed else
                      renamed.get(module, module) + '.' + leaf)] = value
  return out


def _assert_states_equal(a, b):
  flat_a, flat_b = dict(nnx.to_flat_state(a)), dict(nnx.to_flat_state(b))
  assert flat_a.keys() == flat_b.keys()
  for path in flat_a:
    np.testing.assert_array_equal(flat_a[path][...], flat_b[path][...], err_msg=str(path))


@pytest.mark.parametrize('key', [(0, False), (4, False), (0, True)],
                         ids=['plain', 'registers', 'swiglu'])
def test_v4_and_hub_layouts_import_the_same(references, key, tmp_path):
  registers, swiglu = key
  state_dict = _state_dict(references[key])
  _, abstract = _nnx(registers, swiglu)
  from_v5 = dinov2_weights.import_state_dict(state_dict, abstract)

  v4 = _v4_names(state_dict)
  assert dinov2_weights.detect_layout(v4) == 'hf_v4' and dinov2_weights.detect_layout(state_dict) == 'hf_v5'
  _assert_states_equal(dinov2_weights.import_state_dict(v4, abstract), from_v5)
  # A task-model file: `dinov2.` prefix (Dinov2ForImageClassification's base model).
  prefixed = {f'dinov2.{k}': v for k, v in v4.items()}
  _assert_states_equal(dinov2_weights.import_state_dict(prefixed, abstract), from_v5)

  hub = _hub_names(state_dict)
  assert dinov2_weights.detect_layout(hub) == 'hub'
  path = tmp_path / 'dinov2_pretrain.pth'
  torch.save({k: torch.from_numpy(v) for k, v in hub.items()}, path)
  from_hub = dinov2_weights.import_state_dict(read_state_dict(str(path)), abstract)
  _assert_states_equal(from_hub, from_v5)
  exported = dinov2_weights.export_hub_state_dict(from_hub)
  assert exported.keys() == hub.keys()
  for name in hub:
    np.testing.assert_array_equal(exported[name], hub[name], err_msg=name)


def test_mask_token_is_optional():
  reference = _hf_model(0)
  state_dict = _state_dict(reference)
  del state_dict['embeddings.mask_token']
  _, abstract = _nnx(0)
  state = dinov2_weights.import_state_dict(state_dict, abstract)
  np.testing.assert_array_equal(state['mask_token'][...], np.zeros((1, HIDDEN)))


def test_importer_errors(references):
  state_dict = _v4_names(_state_dict(references[(0, False)]))
  _, abstract = _nnx(0)
  del state_dict['encoder.layer.1.attention.attention.key.weight']
  state_dict['encoder.layer.0.bogus.weight'] = np.zeros(3, np.float32)
  state_dict['embeddings.position_embeddings'] = np.zeros((1, 10, HIDDEN), np.float32)
  with pytest.raises(ValueError) as error:
    dinov2_weights.import_state_dict(state_dict, abstract)
  message = str(error.value)
  assert 'transformers v4 names' in message
  assert 'missing keys (1): encoder.layer.1.attention.attention.key.weight' in message
  assert 'unexpected keys (1): encoder.layer.0.bogus.weight' in message
  assert (f'embeddings.position_embeddings: checkpoint (1, 10, {HIDDEN}), '
          f'network (1, 17, {HIDDEN})' in message)

  # A with-registers file into a model without registers, and the reverse.
  with pytest.raises(ValueError, match=r'unexpected keys \(1\): embeddings\.register_tokens'):
    dinov2_weights.import_state_dict(_state_dict(references[(4, False)]), abstract)
  _, with_registers = _nnx(4)
  with pytest.raises(ValueError, match=r'missing keys \(1\): embeddings\.register_tokens'):
    dinov2_weights.import_state_dict(_state_dict(references[(0, False)]), with_registers)
  # torch-hub names are reported as such.
  hub = _hub_names(_state_dict(references[(0, False)]))
  del hub['blocks.0.ls1.gamma']
  with pytest.raises(ValueError, match=r'torch-hub.*missing keys \(1\): blocks\.0\.ls1\.gamma'):
    dinov2_weights.import_state_dict(hub, abstract)
  with pytest.raises(ValueError, match='not a DINOv2 state dict'):
    dinov2_weights.import_state_dict({'conv.weight': np.zeros(3)}, abstract)


@pytest.mark.parametrize('size, registers', [('S', 0), ('B', 0), ('L', 0), ('g', 0), ('B', 4)])
def test_sizes_match_transformers_architectures(size, registers):
  """Every released size: the importer expects exactly the keys and shapes of the HF model
  (built on the meta device), e.g. the giant SwiGLU width (int(4D * 2/3) + 7) // 8 * 8."""
  spec = dinov2.SIZES[size]
  common = dict(hidden_size=spec['hidden_size'], num_hidden_layers=spec['depth'],
                num_attention_heads=spec['num_heads'], use_swiglu_ffn=spec.get('swiglu', False),
                image_size=518, patch_size=14)
  with torch.device('meta'):
    if registers:
      hf = transformers.Dinov2WithRegistersModel(
          transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
      hf = transformers.Dinov2Model(transformers.Dinov2Config(**common))
  want = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
  _, abstract = nnx.split(nnx.eval_shape(lambda: dinov2.DINOv2ViT(
      **spec, num_register_tokens=registers, rngs=nnx.Rngs(0))))
  got = {}
  for path, variable in nnx.to_flat_state(abstract):
    keys = dinov2_weights._hf_keys(dinov2_weights.hub_key(path), 'hf_v5')
    shape = torch_shape(str(path[-1]), variable.shape)
    for key in keys:
      got[key] = (shape[0] // len(keys), *shape[1:])
  assert got == want
  count = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(abstract))
  assert count == sum(int(np.prod(s)) for s in want.values())


# ------------------------------------------------------------------------------------------
# DINOv2 wrapper


@pytest.fixture
def tiny_size(monkeypatch):
  monkeypatch.setitem(dinov2.SIZES, 'tiny', dict(hidden_size=HIDDEN, depth=LAYERS,
                                                 num_heads=HEADS, pos_grid=IMAGE // 14))
  return 'tiny'


def _torch_pipeline(model, pixels: np.ndarray, resolution: int, registers: int):
  """uint8 -> [0, 1] -> ImageNet mean/std -> bicubic resize (no antialias) -> patch tokens."""
  x = torch.from_numpy(pixels.transpose(0, 3, 1, 2).astype(np.float32) / 255.0)
  mean = torch.tensor(dinov2.IMAGENET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(dinov2.IMAGENET_STD).view(1, 3, 1, 1)
  x = F.interpolate((x - mean) / std, size=(resolution, resolution), mode='bicubic',
                    align_corners=False)
  with torch.no_grad():
    return model(x).last_hidden_state.numpy()[:, 1 + registers:]


@pytest.mark.parametrize('registers', [False, True])
def test_wrapper_features(references, tiny_size, registers, tmp_path):
  count = 4 if registers else 0
  reference = references[(count, False)]
  path = tmp_path / 'model.safetensors'
  from safetensors.numpy import save_file
  save_file(_v4_names(_state_dict(reference)), str(path))
  detector = dinov2_encoder.DINOv2(weights_path=str(path), size=tiny_size, registers=registers,
                           resolution=42)
  state = detector.load()
  assert detector.num_tokens == 9 and detector.feature_dim == HIDDEN
  pixels = np.random.default_rng(7).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  want = _torch_pipeline(reference, pixels, 42, count)
  got = jax.jit(detector.features)(state, pixels)
  assert got.shape == (2, 9, HIDDEN)
  np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance(want))
  # The same images as floats in [-1, 1].
  as_float = pixels.astype(np.float32) / 127.5 - 1.0
  np.testing.assert_allclose(jax.jit(detector.features)(state, as_float), want, rtol=0,
                             atol=_tolerance(want))
  patches, cls = detector.features(state, pixels, return_cls=True)
  assert cls.shape == (2, HIDDEN)


def test_wrapper_resampled_pos_embed_is_repa(references, tiny_size, tmp_path):
  """pos_embed='resampled': the table resampled once with antialias (timm
  `resample_abs_pos_embed`), i.e. HF run on a model whose table was replaced that way."""
  reference = _hf_model(0, seed=8)
  path = tmp_path / 'model.safetensors'
  from safetensors.numpy import save_file
  save_file(_state_dict(reference), str(path))
  detector = dinov2_encoder.DINOv2(weights_path=str(path), size=tiny_size, resolution=42,
                           pos_embed='resampled')
  state = detector.load()
  assert state['pos_embed'].shape == (1, 10, HIDDEN)
  with torch.no_grad():
    table = reference.embeddings.position_embeddings
    patch = table[:, 1:].reshape(1, 4, 4, HIDDEN).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(3, 3), mode='bicubic', antialias=True)
    resampled = torch.cat([table[:, :1], patch.permute(0, 2, 3, 1).reshape(1, 9, HIDDEN)], 1)
    reference.embeddings.position_embeddings = torch.nn.Parameter(resampled)
  pixels = np.random.default_rng(9).integers(0, 256, (2, 50, 50, 3), dtype=np.uint8)
  want = _torch_pipeline(reference, pixels, 42, 0)  # HF skips interpolation: 3x3 grid
  got = jax.jit(detector.features)(state, pixels)
  np.testing.assert_allclose(got, want, rtol=0, atol=_tolerance(want))
  hf_variant = dinov2_encoder.DINOv2(weights_path=str(path), size=tiny_size, resolution=42)
  assert np.abs(np.asarray(hf_variant.features(hf_variant.load(), pixels)) - want).max() > 1e-3


def test_wrapper_errors(tmp_path):
  with pytest.raises(ValueError, match=r'DINOv2\.weights_path is not set.*dinov2-base'):
    dinov2_encoder.DINOv2().load()
  missing = str(tmp_path / 'nope.safetensors')
  with pytest.raises(FileNotFoundError, match=r'weights_path=.*nope\.safetensors'):
    dinov2_encoder.DINOv2(weights_path=missing).load()
  with pytest.raises(ValueError, match='resolution=225'):
    dinov2_encoder.DINOv2(resolution=225)
  with pytest.raises(ValueError, match="size='H'"):
    dinov2_encoder.DINOv2(size='H')


def test_wrapper_abstract_base():
  """B/14 at 224: (B, 256, 768) features, built abstractly (no weights)."""
  detector = dinov2_encoder.DINOv2()
  state = detector.abstract_state()
  out = jax.eval_shape(lambda s, x: detector.model(s)(detector.preprocess(x)), state,
                       jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.uint8))
  assert out.shape == (2, 256, 768)
  count = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(state))
  assert count == 86_580_480  # HF facebook/dinov2-base (mask token included)
