"""Sweeps: one experiment expanded over a grid of values, `--sweep=PATH=v1,v2,...` (repeatable;
the cartesian product of all of them, the first flag varying slowest).

    axes = [parse_axis('optimizer.learning_rate=1e-3,1e-4'), parse_axis('data.batch_size=8,16')]
    members = expand(axes)          # 4 members
    members[1].assignments          -> ('optimizer.learning_rate=1e-3', 'data.batch_size=16')
    members[1].name                 -> '001_optimizer.learning_rate=1e-3_data.batch_size=16'
    member_config(config, members[1])  # a copy with the assignments applied, as --fdl_set

Values are split at the commas outside brackets and quotes (`--sweep='x=(1,2),(3,4)'` is two
values) and parsed as `--fdl_set` parses them (`lib.config.overrides`), so a path that does
not exist or a value of the wrong type is refused with the member named.
"""

import copy
import dataclasses
import itertools
import re

import fiddle as fdl

from lib.config import overrides
from lib.errors import UsageError

NAME_LENGTH = 100  # of a member's folder name, its index included


@dataclasses.dataclass(frozen=True)
class Axis:
  path: str
  values: tuple[str, ...]  # as written, each parsed when applied


@dataclasses.dataclass(frozen=True)
class Member:
  index: int
  assignments: tuple[str, ...]  # 'PATH=VALUE', one per axis

  @property
  def name(self) -> str:
    """`NNN_PATH=VALUE_PATH=VALUE`, each run of characters other than letters, digits and
    `._=+-` as one `-`, cut to NAME_LENGTH (the index keeps names unique)."""
    text = '_'.join(self.assignments)
    return f'{self.index:03d}_{re.sub(r"[^A-Za-z0-9._=+-]+", "-", text)}'[:NAME_LENGTH]


def split_values(text: str) -> list[str]:
  """'1e-3,(1, 2),"a,b"' -> ['1e-3', '(1, 2)', '"a,b"']: commas at depth 0, outside quotes."""
  parts, depth, quote, start = [], 0, None, 0
  for i, char in enumerate(text):
    if quote:
      quote = None if char == quote else quote
    elif char in '\'"':
      quote = char
    elif char in '([{':
      depth += 1
    elif char in ')]}':
      depth -= 1
    elif char == ',' and depth == 0:
      parts.append(text[start:i].strip())
      start = i + 1
  return parts + [text[start:].strip()]


def parse_axis(spec: str) -> Axis:
  """`PATH=v1,v2,...` -> Axis; UsageError for a spec without a path or values."""
  path, _, text = spec.partition('=')
  values = split_values(text) if text.strip() else []
  if not path.strip() or not values or '' in values:
    raise UsageError(f'--sweep={spec!r}: expected PATH=VALUE1,VALUE2,... (values as '
                     '--fdl_set takes them)')
  overrides.parse_path(path.strip())
  return Axis(path.strip(), tuple(values))


def expand(axes: list[Axis]) -> list[Member]:
  """The cartesian product of the axes' values, in order (the first axis slowest)."""
  paths = [axis.path for axis in axes]
  if len(set(paths)) != len(paths):
    raise UsageError(f'--sweep: a path is swept twice ({", ".join(paths)}); give each path '
                     'once, with all its values')
  grid = itertools.product(*([f'{axis.path}={value}' for value in axis.values] for axis in axes))
  return [Member(index, assignments) for index, assignments in enumerate(grid)]


def member_config(config: fdl.Buildable, member: Member) -> fdl.Buildable:
  """A copy of `config` with the member's assignments applied (checked as --fdl_set)."""
  config = copy.deepcopy(config)
  for assignment in member.assignments:
    try:
      overrides.apply_override(config, assignment)
    except UsageError as e:
      raise UsageError(f'--sweep member {member.name}: {e}') from None
  return config
