"""Paths a user gives: a local path or a bucket URL (`gs://BUCKET/PATH`), one type for both.

    path = paths.resolve('gs://bucket/runs/x', '--workdir')   # an etils `epath.Path`
    paths.write_atomic(path / 'config.json', text)             # never read half-written
    state_dict = torch.load(io.BytesIO(paths.resolve(file, 'weights file').read_bytes()))

Every user path in `lib/` (workdirs, data folders, weight files, FID statistics, saved
configs) goes through `resolve`, and from there through etils `epath`, the path type orbax
uses: `pathlib` operations on local paths, gcsfs (Google's JSON API) on `gs://` URLs. This
module makes epath take gcsfs for `gs://` rather than TensorFlow's `tf.io.gfile` (its default
when TensorFlow is installed), so that every read and write of `lib/` goes through one
client, honours `STORAGE_EMULATOR_HOST` and needs no TensorFlow. TensorFlow itself still
writes the TensorBoard events (CLU's `SummaryWriter`) through `tf.io.gfile`, which reads
`gs://` with its own GCS client.

A local file is written atomically by a rename from a temporary name beside it; on an object
store a single object write is atomic (readers see the old or the new object), so it is
written in place.
"""

import os
import re
from typing import Iterator

os.environ.setdefault('EPATH_USE_TF', 'false')  # before epath picks a backend: gcsfs for gs://

from etils import epath

from lib import errors, storage

storage.configure_clients()  # before any client starts: a bucket that stalls fails a request

Path = epath.Path
SCHEMES = ('gs',)  # URL schemes the libraries here (gcsfs, tensorstore, tf.io.gfile) all read
_SCHEME = re.compile(r'^([A-Za-z][A-Za-z0-9+.-]*)://')


def scheme(value: os.PathLike | str) -> str | None:
  """'gs' for 'gs://bucket/x', None for a local path."""
  match = _SCHEME.match(os.fspath(value))
  return match.group(1).lower() if match else None


def is_url(value: os.PathLike | str) -> bool:
  return scheme(value) is not None


def resolve(value: os.PathLike | str | None, what: str) -> epath.Path:
  """`value` as an `epath.Path`; UserError naming `what` (the flag or field) when it is not
  set or its URL scheme is not one this project handles. Local paths are made absolute."""
  if value is None:
    raise errors.UserError(f'{what} is not set; set it to a local path or '
                           f'{", ".join(s + "://BUCKET/PATH" for s in SCHEMES)}')
  text = os.fspath(value)
  kind = scheme(text)
  if kind is None:
    return epath.Path(os.path.abspath(os.path.expanduser(text)))
  if kind not in SCHEMES:
    raise errors.UserError(f'{what}={text!r}: unsupported URL scheme {kind}://; expected a '
                           f'local path or {", ".join(s + "://BUCKET/PATH" for s in SCHEMES)}')
  if not text[len(kind) + 3:].split('/')[0]:
    raise errors.UserError(f'{what}={text!r} names no bucket; expected gs://BUCKET/PATH')
  return epath.Path(text)


def is_file(value: os.PathLike | str, what: str) -> bool:
  """Whether the user path `value` (given as `what`) is an existing file."""
  return resolve(value, what).is_file()


def shown(path: os.PathLike | str) -> str:
  """`path` quoted for a message as a path, not as a Python object: `'/data/x'` (or
  `'gs://b/x'`), never `PosixGPath('/data/x')`."""
  return repr(os.fspath(path))


def require_file(field: str, path: str | None, expected: str) -> None:
  """Fails naming `field` when the file `path` (a weights or statistics file a node reads) is
  not set or does not exist; `expected` says what it should be."""
  if not path:
    raise ValueError(f'{field} is not set: set it to {expected}')
  if not is_file(path, field):
    raise FileNotFoundError(f'{field}={shown(path)} does not exist; expected {expected}')


def files_under(folder: epath.Path) -> Iterator[str]:
  """The relative POSIX paths of all files below `folder` (one listing per folder, local or
  in a bucket; epath's `walk` names a bucket's folders without their `gs://`)."""
  base = os.fspath(folder).split('://', 1)[-1].rstrip('/')
  for root, _, names in folder.walk():
    relative = os.fspath(root).split('://', 1)[-1][len(base):].strip('/')
    for name in names:
      yield f'{relative}/{name}' if relative else name


def move(source: epath.Path, target: epath.Path) -> None:
  """Renames the folder `source` to `target` (which must not exist). In a bucket, where a
  folder is a name prefix, each object is copied on the server and then deleted."""
  if is_url(source):
    for name in list(files_under(source)):
      (source / name).copy(target / name)
    source.rmtree()
  else:
    target.parent.mkdir(parents=True, exist_ok=True)
    source.rename(target)


def blob(path: epath.Path):
  """The google-cloud-storage object of a `gs://` path (for writes with preconditions)."""
  from google.cloud import storage as cloud_storage

  bucket, _, name = os.fspath(path)[len('gs://'):].partition('/')
  return cloud_storage.Client().bucket(bucket).blob(name.strip('/'))


def write_atomic(path: epath.Path, data: str | bytes) -> None:
  """Writes `data` so that no reader ever sees a half-written file (see the module doc)."""
  binary = isinstance(data, bytes)
  if is_url(path):
    path.write_bytes(data) if binary else path.write_text(data)
    return
  temporary = f'{os.fspath(path)}.{os.getpid()}.tmp'
  with open(temporary, 'wb' if binary else 'w') as f:
    f.write(data)
  os.replace(temporary, path)


class AppendLog:
  """A text file that grows by lines (`metrics.jsonl`), readable while it grows.

  Locally the file is opened for appending, line-buffered (`tail -f`-able). An object in a
  bucket cannot be appended to, so there the text so far is kept and the object rewritten
  with each write (one small object write per logged step; a log of scalars stays small),
  on the condition that it is still the generation this log last read or wrote: a writer
  whose object was rewritten meanwhile by another (a launch that took its workdir over)
  raises `errors.LockLost` naming the file instead of replacing the other's rows.
  """

  def __init__(self, path: epath.Path):
    self.path = path
    self._url = is_url(path)
    if self._url:
      self._blob = blob(path)
      current = self._blob.bucket.get_blob(self._blob.name, **storage.call_options())
      self._generation = 0 if current is None else current.generation  # 0: no object yet
      self._text = '' if current is None else current.download_as_text(
          if_generation_match=self._generation, **storage.call_options())
    else:
      self._file = open(path, 'a', buffering=1)

  def write(self, text: str) -> None:
    if not self._url:
      self._file.write(text)
      return
    from google.api_core import exceptions

    try:
      self._blob.upload_from_string(self._text + text, content_type='text/plain',
                                    if_generation_match=self._generation,
                                    **storage.call_options())
    except exceptions.PreconditionFailed:
      raise errors.LockLost(f'{shown(self.path)} was rewritten by another launch since this '
                            'run last wrote it (the other launch took the workdir over); this '
                            'run stopped without overwriting it') from None
    self._text += text
    self._generation = self._blob.generation

  def flush(self) -> None:
    if not self._url:
      self._file.flush()

  def close(self) -> None:
    if not self._url:
      self._file.close()
