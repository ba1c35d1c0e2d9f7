"""The NNX FID Inception-v3 vs a plain-torch network of the same architecture (pytorch-fid's
FID variant), with every weight and BatchNorm statistic random, through the .pth importer."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')
from torch import nn as tnn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import jax  # noqa: E402
from flax import nnx  # noqa: E402

from lib.eval import inception  # noqa: E402


# ----------------------------------------------------------------------------- torch reference
class Conv(tnn.Module):

  def __init__(self, cin, cout, kernel, stride=1, padding=0):
    super().__init__()
    self.conv = tnn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
    self.bn = tnn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def avg3(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class A(tnn.Module):

  def __init__(self, cin, pool):
    super().__init__()
    self.branch1x1 = Conv(cin, 64, 1)
    self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = Conv(cin, 64, 1)
    self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = Conv(96, 96, 3, padding=1)
    self.branch_pool = Conv(cin, pool, 1)

  def forward(self, x):
    return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      self.branch_pool(avg3(x))], 1)


class B(tnn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = Conv(cin, 384, 3, stride=2)
    self.branch3x3dbl_1 = Conv(cin, 64, 1)
    self.branch3x3dbl_2 = Conv(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = Conv(96, 96, 3, stride=2)

  def forward(self, x):
    return torch.cat([self.branch3x3(x),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      F.max_pool2d(x, 3, stride=2)], 1)


class C(tnn.Module):

  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = Conv(cin, 192, 1)
    self.branch7x7_1 = Conv(cin, c7, 1)
    self.branch7x7_2 = Conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = Conv(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = Conv(cin, c7, 1)
    self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = Conv(cin, 192, 1)

  def forward(self, x):
    d = x
    for i in range(1, 6):
      d = getattr(self, f'branch7x7dbl_{i}')(d)
    return torch.cat([self.branch1x1(x),
                      self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), d,
                      self.branch_pool(avg3(x))], 1)


class D(tnn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, stride=2)
    self.branch7x7x3_1 = Conv(cin, 192, 1)
    self.branch7x7x3_2 = Conv(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = Conv(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = Conv(192, 192, 3, stride=2)

  def forward(self, x):
    s = x
    for i in range(1, 5):
      s = getattr(self, f'branch7x7x3_{i}')(s)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), s, F.max_pool2d(x, 3, stride=2)], 1)


class E(tnn.Module):

  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = Conv(cin, 320, 1)
    self.branch3x3_1 = Conv(cin, 384, 1)
    self.branch3x3_2a = Conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = Conv(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = Conv(cin, 448, 1)
    self.branch3x3dbl_2 = Conv(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = Conv(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = Conv(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = Conv(cin, 192, 1)

  def forward(self, x):
    s = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    p = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg3(x)
    return torch.cat([self.branch1x1(x), self.branch3x3_2a(s), self.branch3x3_2b(s),
                      self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(p)], 1)


class FIDInception(tnn.Module):

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = Conv(3, 32, 3, stride=2)
    self.Conv2d_2a_3x3 = Conv(32, 32, 3)
    self.Conv2d_2b_3x3 = Conv(32, 64, 3, padding=1)
    self.Conv2d_3b_1x1 = Conv(64, 80, 1)
    self.Conv2d_4a_3x3 = Conv(80, 192, 3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
    self.Mixed_6a = B(288)
    self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
    self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
    self.Mixed_7a = D(768)
    self.Mixed_7b, self.Mixed_7c = E(1280, False), E(2048, True)
    self.fc = tnn.Linear(2048, 1008)

  def forward(self, x, resize=True):
    """x: NCHW in [0, 1], as pytorch-fid."""
    if resize:
      x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)
    x = 2 * x - 1
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, 3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, 3, stride=2)
    for name in ('5b', '5c', '5d', '6a', '6b', '6c', '6d', '6e', '7a', '7b', '7c'):
      x = getattr(self, f'Mixed_{name}')(x)
    pool = x.mean((2, 3))
    return pool, self.fc(pool)


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """(torch network with random weights and BatchNorm statistics, path of its .pth)."""
  torch.manual_seed(0)
  net = FIDInception().eval()
  with torch.no_grad():
    for name, p in net.named_parameters():
      if p.ndim == 4:
        p.copy_(torch.randn_like(p) * (2.0 / p[0].numel()) ** 0.5)
      elif name.endswith('bn.weight'):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
    for name, b in net.named_buffers():
      if name.endswith('running_mean'):
        b.copy_(0.2 * torch.randn_like(b))
      elif name.endswith('running_var'):
        b.copy_(0.5 + torch.rand_like(b))
  path = tmp_path_factory.mktemp('inception') / inception.WEIGHTS_FILE
  torch.save(net.state_dict(), path)  # includes num_batches_tracked, as real files may
  return net, str(path)


def _close(got, want):
  scale = float(np.abs(want).max())
  assert scale > 1e-2
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, scale))
  print(f"max abs diff {np.abs(got - want).max():.3g} at scale {scale:.3g}")


def test_matches_torch_without_resize(reference):
  """139 px: 3x3 maps in the E blocks, so both padded pools and the 7c max pool matter."""
  net, path = reference
  graphdef, state = inception.load(path, fc_bias=True)
  images = np.random.default_rng(0).integers(0, 256, (2, 139, 139, 3)).astype(np.uint8)
  with torch.no_grad():
    want_pool, want_logits = net(torch.from_numpy(images.transpose(0, 3, 1, 2) / 255.0).float(),
                                 resize=False)
  pool, logits = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, resize=False))(state, images)
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  _close(np.asarray(pool), want_pool.numpy())
  _close(np.asarray(logits), want_logits.numpy())


def test_matches_torch_at_299_and_unbiased_logits(reference):
  net, path = reference
  detector = inception.Detector(path, batch_size=2)
  images = np.random.default_rng(1).integers(0, 256, (2, 64, 80, 3)).astype(np.uint8)
  with torch.no_grad():
    want_pool, want_logits = net(torch.from_numpy(images.transpose(0, 3, 1, 2) / 255.0).float())
  pool, logits = detector(images)
  _close(pool, want_pool.numpy())
  # the Inception Score logits: the matmul before the bias
  _close(logits, (want_logits - net.fc.bias.detach()).numpy())


def test_resize_matches_torch_bilinear():
  rng = np.random.default_rng(2)
  for shape in ((1, 37, 50, 3), (1, 512, 400, 3)):
    x = rng.normal(size=shape).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=(299, 299),
                         mode='bilinear', align_corners=False).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(inception.resize_bilinear(x, 299), want, atol=1e-5)


def test_import_errors_name_the_keys(reference, tmp_path):
  net, _ = reference
  state_dict = {k: v.numpy() for k, v in net.state_dict().items()}
  _, abstract_state = inception.abstract()
  broken = dict(state_dict)
  del broken['Mixed_6b.branch1x1.conv.weight']
  broken['AuxLogits.fc.weight'] = np.zeros((1000, 768), np.float32)
  broken['fc.weight'] = np.zeros((1000, 2048), np.float32)
  with pytest.raises(ValueError) as error:
    inception.import_state_dict(broken, abstract_state)
  message = str(error.value)
  assert 'missing keys (1): Mixed_6b.branch1x1.conv.weight' in message
  assert 'unexpected keys (1): AuxLogits.fc.weight' in message
  assert 'fc.weight: checkpoint (1000, 2048), network (1008, 2048)' in message
  assert 'pt_inception-2015-12-05' in message
  with pytest.raises(FileNotFoundError, match='inception_weights=.*does not exist.*pt_inception'):
    inception.load(str(tmp_path / 'nope.pth'))
