"""Where the train step's time goes: per-fusion times of the compiled step, grouped by what
they compute.

    python benchmarks/profile_step.py --fdl_config=experiments/dit.py:s2 --batch_size=16
    python benchmarks/profile_step.py --fdl_config=experiments/dit.py:b2 --batch_size=8 --top=30

Compiles the real step of `lib.train.Run` (`train_step.compile_step`) with XLA's optimized
module dumped (`--xla_dump_to`, added to any XLA_FLAGS already set), runs `--warmup` steps,
then `--steps` under `jax.profiler`. Each thunk event of the trace names one instruction of the
optimized module; its time is added to a group chosen from the instruction and the Python
frames that produced it (the module's stack-frame table):

    copies        copy / transpose instructions and fusions XLA named after them (layouts)
    attention     the attention core (q k^T, softmax, weights @ v) forward and backward, and
                  splitting / merging heads; not the qkv and output projections
    dots fwd/bwd  the other dots (Linear layers, patch embedding, adaLN), forward or backward
                  (`transpose(jvp(...))` in the op name)
    norms+mod     LayerNorm / RMSNorm, adaLN modulate, gates and residuals, forward and backward
    mlp act       the MLP's activation (GELU / SwiGLU gate) forward and backward
    optimizer     optax's update (and the gradient norm)
    ema           the EMA update
    other         time embedding, label embedding, loss, noise, encoder, RNG

Prints one JSON object: the measured step time, the summed thunk time per group (thunks of
one step may run concurrently, and one thunk may use several threads, so the groups are
shares of busy time, not of wall time) and the `--top` slowest instructions.
"""

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import train_step  # noqa: E402  (puts the repository on sys.path)

GROUPS = ('copies', 'attention', 'dots fwd', 'dots bwd', 'norms+mod', 'mlp act', 'optimizer',
          'ema', 'other')
# Python functions (innermost frame first) whose instructions belong to a group.
ATTENTION = {'attention', '_cpu_attention', '_cpu_attention_forward', '_cpu_attention_backward',
             '_attention_one', '_attention_one_backward'}
MLP_ACTIVATION = {'gelu_tanh', '_gelu_tanh_jvp', 'gelu', 'silu'}
MLP_MODULES = {'Mlp.__call__', 'SwiGLU.__call__', 'SplitSwiGLU.__call__'}
NORMS = {'normalize', '_normalize_forward', '_normalize_backward', 'LayerNorm.__call__',
         'RMSNorm.__call__', 'modulate'}
BLOCKS = {'DiTBlock.__call__', 'LightningDiTBlock.__call__', 'DDTBlock.__call__',
          'FinalLayer.__call__'}  # gates and residual additions
CONTAINERS = re.compile(r'^(while|conditional|call)(\.\d+)?$')
COPY_NAMES = re.compile(r'^(copy|transpose|bitcast_copy|copy_bitcast|transpose_copy)')


def _frames_table(text: str) -> dict[int, list[tuple[str, str]]]:
  """stack_frame_id -> [(file, function), ...] innermost first, from the module's
  FileNames / FunctionNames / FileLocations / StackFrames sections (ids are 1-based; a frame
  prints its location and its parent's id + 1, 1 for none)."""
  sections, current = collections.defaultdict(list), None
  for line in text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      current = line
    elif current and re.match(r'^\d+ ', line):
      sections[current].append(line.split(' ', 1)[1])
    elif current and line.strip():
      current = None
  files = [s.strip('"') for s in sections['FileNames']]
  functions = [s.strip('"') for s in sections['FunctionNames']]
  locations = []
  for entry in sections['FileLocations']:
    fields = dict(re.findall(r'(\w+)=(\d+)', entry))
    locations.append((files[int(fields['file_name_id']) - 1],
                      functions[int(fields['function_name_id']) - 1]))
  parents, own = [], []
  for entry in sections['StackFrames']:
    fields = dict(re.findall(r'(\w+)=(\d+)', entry))
    own.append(locations[int(fields['file_location_id']) - 1])
    parents.append(int(fields['parent_frame_id']) - 1)
  chains = {}
  for frame_id in range(1, len(own) + 1):
    chain, current = [], frame_id
    while current and len(chain) < 64:
      chain.append(own[current - 1])
      current = parents[current - 1] if parents[current - 1] != current else 0
    chains[frame_id] = chain
  return chains


def instructions(module_text: str) -> dict[str, dict]:
  """name -> {opcode, op_name, chain, is_dot} for every instruction of the module (thunks are
  the entry computation's and those of loop bodies)."""
  chains = _frames_table(module_text)
  out = {}
  for line in module_text[module_text.index('\n'):].splitlines():
    match = re.match(r'^\s+(?:ROOT )?%([\w.\-]+) = \S+(?:\{[^}]*\})? (\w[\w\-]*)\(', line)
    if not match:
      continue
    name, opcode = match.groups()
    op_name = re.search(r'op_name="([^"]*)"', line)
    op_name = op_name.group(1) if op_name else ''
    frame = re.search(r'stack_frame_id=(\d+)', line)
    out[name] = {'opcode': opcode, 'op_name': op_name,
                 'chain': chains.get(int(frame.group(1)), []) if frame else [],
                 'is_dot': opcode in ('dot', 'convolution') or '__ynn_fusion' in line or
                           '__xnn_fusion' in line or 'dot_general' in op_name}
  return out


def group_of(name: str, info: dict) -> str:
  """The group (module docstring) of one instruction of the optimized module."""
  functions = {function.split('.<locals>.')[-1] for _, function in info['chain']}
  files = [path for path, _ in info['chain']]
  if info['opcode'] in ('copy', 'transpose') or COPY_NAMES.match(name):
    return 'copies'
  innermost = info['chain'][0][1] if info['chain'] else ''
  if functions & ATTENTION or innermost.endswith(('Attention.__call__', 'Attention.qkv_heads')):
    return 'attention'  # the core, and splitting / merging heads (not the qkv / out Linears)
  if any(os.sep + 'optax' + os.sep in path for path in files):
    return 'optimizer'
  if any(path.endswith(os.path.join('lib', 'ema.py')) for path in files):
    return 'ema'
  if info['is_dot']:
    return 'dots bwd' if 'transpose(' in info['op_name'] else 'dots fwd'
  if functions & MLP_ACTIVATION or innermost in MLP_MODULES:
    return 'mlp act'
  if functions & NORMS or innermost in BLOCKS:
    return 'norms+mod'
  return 'other'


def thunk_times(trace_dir: str) -> dict[str, float]:
  """Summed duration (seconds) per HLO instruction of the step's module in the trace (loops
  and calls count through the instructions of their bodies)."""
  path = glob.glob(os.path.join(trace_dir, '**', '*.trace.json.gz'), recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)['traceEvents']
  totals = collections.defaultdict(float)
  for event in events:
    args = event.get('args', {})
    if event.get('ph') == 'X' and '_step' in args.get('hlo_module', '') and 'hlo_op' in args \
        and not CONTAINERS.match(args['hlo_op']):
      totals[args['hlo_op']] += event['dur'] * 1e-6
  return totals


def profile(config, steps: int, warmup: int, top: int, dump_dir: str) -> dict:
  """Runs the step under the profiler (XLA_FLAGS must already dump to `dump_dir`)."""
  import jax

  step = train_step.compile_step(config)
  state, *rest = step.args
  for _ in range(warmup):
    state, _ = step.compiled(state, *rest)
  jax.block_until_ready(state)
  trace_dir = os.path.join(dump_dir, 'trace')
  start = time.perf_counter()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      state, metrics = step.compiled(state, *rest)
      jax.block_until_ready((state, metrics))
  wall = (time.perf_counter() - start) / steps
  [module_path] = glob.glob(os.path.join(dump_dir, '*_step*after_optimizations.txt'))
  with open(module_path) as f:
    table = instructions(f.read())
  times = thunk_times(trace_dir)
  group = lambda name: group_of(name, table[name]) if name in table else 'other'  # noqa: E731
  groups = collections.defaultdict(float)
  for name, seconds in times.items():
    groups[group(name)] += seconds / steps
  busy = sum(groups.values())
  slowest = sorted(times.items(), key=lambda item: -item[1])[:top]
  return {
      'preset': flags.FLAGS.fdl_config,
      'batch': step.experiment.data.batch_size,
      'backend': jax.default_backend(),
      'xla_flags': os.environ['XLA_FLAGS'],
      'step_s_while_tracing': round(wall, 3),
      'busy_s': round(busy, 3),
      'groups_s': {g: round(groups.get(g, 0.0), 3) for g in GROUPS},
      'groups_percent': {g: round(100 * groups.get(g, 0.0) / busy, 1) for g in GROUPS},
      'slowest': [f'{seconds / steps * 1e3:8.1f} ms  {group(name):10s}  {name}  '
                  f'{table.get(name, {}).get("op_name", "")}' for name, seconds in slowest],
      'dump_dir': dump_dir,
  }


def main(argv) -> int:
  from lib import errors
  from lib.config import overrides, presets
  from lib.experiment import ConfigError

  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  try:
    if not flags.FLAGS.fdl_config:
      raise errors.UsageError('--fdl_config=PATH.py:PRESET is required')
    config = presets.load_preset(flags.FLAGS.fdl_config)
    for assignment in flags.FLAGS.fdl_set:
      overrides.apply_override(config, assignment)
    if flags.FLAGS.batch_size is not None:
      overrides.apply_override(config, f'data.batch_size={flags.FLAGS.batch_size}')
    dump_dir = tempfile.mkdtemp(prefix='fiddlediff_profile_')
    # Read when the backend starts, which no import above has done.
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + f' --xla_dump_to={dump_dir} '
                               '--xla_dump_hlo_module_re=.*_step.*').strip()
    result = profile(config, flags.FLAGS.steps, flags.FLAGS.warmup, flags.FLAGS.top, dump_dir)
  except (errors.UsageError, ConfigError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(json.dumps(result, indent=1))
  return 0


if __name__ == '__main__':
  from fiddle import absl_flags  # registers --fdl_config and --fdl_set

  flags.DEFINE_integer('batch_size', None, 'Global batch size (default: the preset\'s).')
  flags.DEFINE_integer('steps', 2, 'Traced steps.')
  flags.DEFINE_integer('warmup', 1, 'Untimed steps after compilation.')
  flags.DEFINE_integer('top', 15, 'How many of the slowest instructions to list.')
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=absl_flags.flags_parser)
