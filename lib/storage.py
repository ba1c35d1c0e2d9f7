"""Failures to write a run's files, as one message: a full disk, a folder that cannot be written,
storage (a bucket) that does not answer.

    retrying(lambda: save(...), 'saving step 8')  # transient failures retried with backoff
    storage_error(error, workdir)  # errors.StorageError naming the folder, or None

Such failures reach the training loop from many writers (orbax and tensorstore raise
`ValueError('RESOURCE_EXHAUSTED: ... No space left on device [os_error_code=28]')`, Python's
files `OSError(ENOSPC)`, CLU's asynchronous writer an `AsyncError` wrapping either), so they are
recognised by the errno anywhere in the exception's chain or by the operating system's message
in its text. They stop the run at once (retrying cannot free space or grant permission) with
exit status 2; the checkpoints already written are complete (orbax commits a step only when it
is whole), and the relaunch resumes from the newest.

A transient failure (a connection refused or timed out, a service error such as "503 Service
Unavailable" or tensorstore's UNAVAILABLE) of a checkpoint save is retried with exponential backoff (1 s,
doubling, at most 60 s apart) for `FIDDLEDIFF_IO_RETRY_SECS` seconds (default 300), on top of
the client libraries' own retries; then the run stops the same way, naming the newest intact
checkpoint (status 2).

A bucket that stops answering (connections accepted, no reply) must fail a request rather than
hang the run, so `configure_clients()` (run when `lib.paths` is imported) bounds each client's
wait by `FIDDLEDIFF_IO_TIMEOUT_SECS` (default 60), leaving any setting the user made alone:
- tensorstore (orbax's arrays): a transfer that moves nothing for that long is aborted
  (`TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS`, `TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES=1`,
  `TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS`) and retried `TENSORSTORE_RETRIES` times
  (`limit_tensorstore_retries`: the context option `gcs_request_retries`);
- gcsfs (`lib.paths`): that long for a request, four times that for a whole call (fsspec's
  `gs` options `requests_timeout`, `timeout`);
- google-cloud-storage (the workdir lock, `lib.paths.AppendLog`): `call_options()` on each call;
- TensorFlow's GCS client (TensorBoard events): `GCS_REQUEST_CONNECTION_TIMEOUT_SECS`,
  `GCS_REQUEST_IDLE_TIMEOUT_SECS`, `GCS_{METADATA,READ,WRITE}_REQUEST_TIMEOUT_SECS`.
A timed-out request is a transient failure: retried as above, then the run stops with one line.
"""

import errno
import os
import re
import time
from typing import Callable

from absl import logging

from lib import errors

RETRY_SECS = float(os.environ.get('FIDDLEDIFF_IO_RETRY_SECS', 300.0))
TIMEOUT_SECS = float(os.environ.get('FIDDLEDIFF_IO_TIMEOUT_SECS', 60.0))
TENSORSTORE_RETRIES = 3
_TRANSIENT = re.compile(r'\b(UNAVAILABLE|DEADLINE_EXCEEDED|Service Unavailable|Bad Gateway|'
                        r'Gateway Timeout|Too Many Requests|Connection (refused|reset|aborted)|'
                        r'timed out|Timeout was reached|Operation too slow)\b')
_UNANSWERED = -1  # _cause's errno for storage that does not answer

# errno -> (what it means, what to do)
_CAUSES = {
    errno.ENOSPC: ('the disk is full', 'free space there (or move the workdir)'),
    errno.EDQUOT: ('the disk quota is exhausted', 'free space there (or move the workdir)'),
    errno.EACCES: ('permission denied', 'make it writable by this user'),
    errno.EPERM: ('operation not permitted', 'make it writable by this user'),
    errno.EROFS: ('the file system is read-only', 'remount it writable (or move the workdir)'),
}
_MESSAGES = {os.strerror(number): number for number in _CAUSES}
_CAUSES[_UNANSWERED] = ('the storage did not answer', 'check that it is reachable')


def _chain(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _cause(error: BaseException) -> tuple[int, str | None] | None:
  """(errno, the path it names or None) of the first write failure in `error`'s chain."""
  for link in _chain(error):
    if isinstance(link, OSError) and link.errno in _CAUSES:
      return link.errno, link.filename
    text = str(link)
    for message, number in _MESSAGES.items():
      if message in text or f"os_error_code='{number}'" in text:
        path = re.search(r'"(/[^"]+)"', text)
        return number, path.group(1) if path else None
  if is_transient(error):
    return _UNANSWERED, None
  return None


def is_transient(error: BaseException) -> bool:
  """Whether `error` (or an error in its chain) is one that a later attempt may not meet."""
  for link in _chain(error):
    if isinstance(link, (ConnectionError, TimeoutError)) or _TRANSIENT.search(str(link)) or \
        type(link).__name__ in ('ServiceUnavailable', 'RetryError', 'DeadlineExceeded',
                                'TooManyRequests', 'InternalServerError', 'GatewayTimeout'):
      return True
  return False


def retrying(write, what: str):
  """`write()`, retried after transient failures with backoff for RETRY_SECS seconds; the
  last failure is raised (and any other failure at once)."""
  deadline, delay = time.monotonic() + RETRY_SECS, 1.0
  while True:
    try:
      return write()
    except Exception as error:
      if not is_transient(error) or time.monotonic() + delay > deadline:
        raise
      logging.warning('%s failed (%s); retrying in %.0f s (for up to FIDDLEDIFF_IO_RETRY_SECS=%.0f '
                      's in all)', what, str(error).strip().splitlines()[0][:300], delay,
                      RETRY_SECS)
      time.sleep(delay)
      delay = min(2 * delay, 60.0)


def storage_error(error: BaseException, workdir,
                  newest_step: Callable[[], int | None]) -> errors.UserError | None:
  """The one-line `StorageError` for a write failure of the run in `workdir` (naming the
  folder, the cause, the newest intact checkpoint and what to do), or None for other errors.
  `newest_step()` gives that checkpoint's step without reading the storage (the run's orbax
  manager knows it, its failed saves dropped).
  A `UserError` that a writer's thread raised (CLU's `AsyncError` wraps it) comes back as
  itself (a copy), e.g. the `LockLost` of a fenced `metrics.jsonl`."""
  for link in _chain(error):
    if isinstance(link, errors.UserError):
      return type(link)(*link.args)
  cause = _cause(error)
  if cause is None:
    return None
  number, path = cause
  meaning, remedy = _CAUSES[number]
  folder = os.fspath(workdir)
  if path and path.startswith(folder + os.sep):  # the workdir's folder holding it
    parts = os.path.relpath(path, folder).split(os.sep)
    folder = os.path.join(folder, parts[0]) if len(parts) > 1 else folder
  elif path:
    folder = os.path.dirname(path)
  newest, checkpoints = newest_step(), f'{os.fspath(workdir).rstrip("/")}/checkpoints'
  kept = (f'the newest intact checkpoint is step {newest} in {checkpoints}'
          if newest is not None else f'there is no checkpoint in {checkpoints} yet')
  return errors.StorageError(f'cannot write to {folder}: {meaning}; the run stopped and {kept}; '
                             f'{remedy}, then relaunch the same command to resume')


def configure_clients() -> None:
  """Bounds the storage clients' waits by TIMEOUT_SECS (see the module docstring), leaving
  each setting the user made alone."""
  seconds = str(max(1, round(TIMEOUT_SECS)))
  for name, value in (('TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS', seconds),
                      ('TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES', '1'),
                      ('TENSORSTORE_CURL_CONNECT_TIMEOUT_SECONDS', seconds),
                      ('GCS_REQUEST_CONNECTION_TIMEOUT_SECS', seconds),
                      ('GCS_REQUEST_IDLE_TIMEOUT_SECS', seconds),
                      ('GCS_METADATA_REQUEST_TIMEOUT_SECS', seconds),
                      ('GCS_READ_REQUEST_TIMEOUT_SECS', seconds),
                      ('GCS_WRITE_REQUEST_TIMEOUT_SECS', seconds)):
    os.environ.setdefault(name, value)
  from fsspec import config

  options = config.conf.setdefault('gs', {})
  options.setdefault('requests_timeout', TIMEOUT_SECS)
  options.setdefault('timeout', 4 * TIMEOUT_SECS)


def limit_tensorstore_retries() -> None:
  """Gives orbax's tensorstore contexts at most TENSORSTORE_RETRIES retries of a failed bucket
  request (tensorstore's default, 32 attempts up to 32 s apart, would outlast RETRY_SECS)."""
  from orbax.checkpoint._src.serialization import tensorstore_utils

  for context in (tensorstore_utils._BASE_TS_CONTEXT,
                  tensorstore_utils._DEFAULT_OCDBT_TS_CONTEXT):
    context.setdefault('gcs_request_retries', {'max_retries': TENSORSTORE_RETRIES,
                                               'initial_delay': '1s', 'max_delay': '8s'})


def call_options() -> dict:
  """google-cloud-storage's per-call `timeout` and `retry` (which gives up after TIMEOUT_SECS
  of retrying: a `RetryError`), for every call of the workdir lock and the bucket log."""
  from google.cloud.storage import retry

  return {'timeout': TIMEOUT_SECS, 'retry': retry.DEFAULT_RETRY.with_timeout(TIMEOUT_SECS)}
