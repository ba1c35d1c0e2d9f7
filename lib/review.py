"""Looking at an experiment graph before spending compute: drawings, provenance, diffs,
saved configs and exported presets. Nothing here builds the experiment.

    render(config, 'graph.svg')            # also .png, .dot (Fiddle graphviz), .html (foldable tree)
    provenance_lines(config)               # 'network.depth = 4  # experiments/dit.py:57 (digits)'
    diff_lines(old, new)                   # 'network.depth: 12 -> 28'
    load_config_file('run/config.json')    # Fiddle JSON, imports restricted to the project
    saved_values('run')                    # the effective values a run saved (effective.json)
    python_source(config, 'my_preset')     # a plain preset function building the same graph
"""

import ast
import html
import json
import os
import shutil

import fiddle as fdl
from fiddle import graphviz, history
from fiddle.codegen import codegen
from fiddle.experimental import serialization

from lib import cli

DOT_MISSING = ("graphviz's `dot` program is not installed, so only the .dot source was written; "
               "install it with `apt-get install graphviz` (Debian/Ubuntu) or "
               "`brew install graphviz` (macOS), then render with `dot -Tsvg FILE.dot -o FILE.svg`")


# ------------------------------------------------------------------------------- drawing
def render(config: fdl.Buildable, path: str, old: fdl.Buildable | None = None,
           defaults: bool = True) -> str | None:
  """Draws `config` (or its difference from `old`) to `path` by extension: .svg, .png, .dot
  or .html. With `defaults` (always for a difference) arguments left at their constructor
  defaults are drawn too (`cli.with_defaults`). Shared nodes are drawn once with all their
  edges. Returns a warning when `dot` is missing (the .dot source is written beside `path`
  instead)."""
  extension = os.path.splitext(path)[1].lower()
  if defaults or old is not None:
    config = cli.with_defaults(config)
  if extension == '.html':
    if old is not None:
      raise cli.UsageError('--render=FILE.html draws one config; use .svg, .png or .dot '
                           'with --diff_against')
    with open(path, 'w') as f:
      f.write(html_tree(config))
    return None
  if extension not in ('.svg', '.png', '.dot'):
    raise cli.UsageError(f'--render={path}: expected a .svg, .png, .dot or .html file')
  graph = graphviz.render(config) if old is None else \
      graphviz.render_diff(old=cli.with_defaults(old), new=config)
  dot_path = os.path.splitext(path)[0] + '.dot'
  if extension == '.dot' or shutil.which('dot') is None:
    with open(dot_path, 'w') as f:
      f.write(graph.source)
    return None if extension == '.dot' else DOT_MISSING.replace('FILE', os.path.splitext(path)[0])
  with open(path, 'wb') as f:
    f.write(graph.pipe(format=extension[1:]))
  return None


def html_tree(config: fdl.Buildable) -> str:
  """A self-contained HTML page: the config as a tree of foldable nodes, each leaf with the
  place its value was set (greyed, `default of TARGET`, for a default of a `cli.with_defaults`
  copy). A node reached by several paths is expanded once; later occurrences link to it."""
  seen: dict[int, str] = {}

  def node_html(node, path) -> str:
    label = cli.format_path(path) or 'experiment'
    if id(node) in seen:
      return (f'<li><b>{html.escape(label)}</b>: shared with '
              f'<a href="#{seen[id(node)]}">{html.escape(seen[id(node)])}</a></li>')
    anchor = seen[id(node)] = cli.format_path(path) or 'experiment'
    target = cli.qualified_name(fdl.get_callable(node))
    items = []
    for name, value in fdl.ordered_arguments(node).items():
      child = path + [name]
      if isinstance(value, fdl.Buildable):
        items.append(node_html(value, child))
      elif isinstance(value, (list, tuple)) and any(isinstance(v, fdl.Buildable) for v in value):
        items.extend(node_html(v, child + [i]) if isinstance(v, fdl.Buildable) else
                     leaf_html(node, name, v, child + [i]) for i, v in enumerate(value))
      else:
        items.append(leaf_html(node, name, value, child))
    return (f'<li id="{html.escape(anchor)}"><details open><summary><b>{html.escape(label)}'
            f'</b> = {type(node).__name__}[{html.escape(target)}]</summary><ul>'
            f'{"".join(items)}</ul></details></li>')

  def leaf_html(parent, name, value, path) -> str:
    where = cli.value_source(parent, name)
    kind = ' class="default"' if cli.default_owner(parent, name) else ''
    return (f'<li{kind}><code>{html.escape(cli.format_path(path))} = '
            f'{html.escape(cli.leaf_repr(value))}</code>'
            f'<span class="src">{html.escape(where)}</span></li>')

  style = ('body{font-family:sans-serif} ul{list-style:none;padding-left:1.2em} '
           '.src{color:#888;margin-left:1em;font-size:85%} summary{cursor:pointer} '
           '.default code{color:#777}')
  return (f'<!doctype html><html><head><meta charset="utf-8"><title>experiment config</title>'
          f'<style>{style}</style></head><body><ul>{node_html(config, [])}</ul></body></html>\n')


# ------------------------------------------------------------------------------- provenance
def provenance_lines(config: fdl.Buildable) -> list[str]:
  """`cli.flat_lines` with, after each leaf, where its value was last set: a preset file
  and line, a shared building block, or the --fdl_set flag (Fiddle's history)."""
  return cli.flat_lines(config, with_source=True)


# ------------------------------------------------------------------------------- diffs
def diff_lines(old: fdl.Buildable, new: fdl.Buildable) -> list[str]:
  """`values_diff_lines` of the two configs' effective values (defaults included)."""
  return values_diff_lines(cli.effective_values(old), cli.effective_values(new))


def values_diff_lines(old: dict, new: dict) -> list[str]:
  """`path: old -> new` for each path whose effective value (`cli.effective_values`) differs,
  by path; a side that is a constructor default reads `value (default of TARGET)`, a path only
  one side has reads `(unset)` on the other:

      network.depth: 28 -> 12
      sampler.guidance_scale: 1.0 (default of lib.flow.samplers.Heun) -> 4.0 (default of ...)
  """

  def side(values, path):
    if path not in values:
      return '(unset)'
    owner = values[path].get('default_of')
    return values[path]['value'] + (f' (default of {owner})' if owner else '')

  changed = sorted(path for path in old.keys() | new.keys()
                   if old.get(path, {}).get('value') != new.get(path, {}).get('value'))
  return [f'{path}: {side(old, path)} -> {side(new, path)}' for path in changed]


# ------------------------------------------------------------------------------- saved configs
class ProjectImports(serialization.PyrefPolicy):
  """Lets a config file import only from this project and the libraries its graphs use."""
  ALLOWED = ('lib', 'experiments', 'fiddle', 'jax', 'flax', 'optax', 'numpy', 'builtins',
             'orbax', 'clu')

  def allows_import(self, module: str, symbol: str) -> bool:
    return module.split('.')[0] in self.ALLOWED

  def allows_value(self, value) -> bool:
    return True


def dump_config(config: fdl.Buildable) -> str:
  """Fiddle JSON of `config`, plus, under 'provenance', where each argument was set (Fiddle's
  history, which its JSON leaves out): `{"network.depth": [FILE, LINE, FUNCTION], ...}`."""
  result = json.loads(serialization.dump_json(config))
  result['provenance'] = _set_locations(config)
  return json.dumps(result, indent=2)


def _set_locations(config: fdl.Buildable) -> dict[str, list]:
  """Path of each argument set in `config` -> [filename, line, function] of its last setting."""
  locations = {}

  def walk(node, path):
    if isinstance(node, fdl.Buildable):
      for name, value in node.__arguments__.items():
        entries = node.__argument_history__.get(name)
        if entries:
          location = entries[-1].location
          locations[cli.format_path(path + [name])] = [
              location.filename, location.line_number, location.function_name]
        walk(value, path + [name])
    elif isinstance(node, (list, tuple)):
      for index, value in enumerate(node):
        walk(value, path + [index])

  walk(config, [])
  return locations


def _restore_locations(config: fdl.Buildable, locations: dict[str, list]) -> None:
  """Records each saved location as its argument's latest setting (dump_config's inverse)."""
  for path, (filename, line, function) in locations.items():
    *parents, name = cli.parse_path(path)
    node = config
    for part in parents:
      node = node[part] if isinstance(part, int) else getattr(node, part)
    with history.custom_location(lambda: history.Location(filename, line, function)):
      setattr(node, name, getattr(node, name))


def load_config_file(path, what: str = '--fdl_config_file') -> fdl.Buildable:
  """A config saved by a run (`WORKDIR/config.json`, local or in a bucket)."""
  from lib import paths

  file = paths.resolve(path, what)
  if file.is_dir():
    file, path = file / 'config.json', f'{os.fspath(path).rstrip("/")}/config.json'
  if not file.is_file():
    raise cli.UsageError(f'no config file {os.fspath(path)!r}; a run saves its config as '
                         'WORKDIR/config.json')
  text = file.read_text()
  try:
    config = serialization.load_json(text, pyref_policy=ProjectImports())
  except serialization.PyrefPolicyError as e:
    raise cli.UsageError(f'{path} refers to code outside the project and its libraries ({e}); '
                         f'only modules under {", ".join(ProjectImports.ALLOWED)} may be '
                         f'imported from a config file') from None
  except (ValueError, KeyError, TypeError) as e:
    raise cli.UsageError(f'{path} is not a Fiddle JSON config: {e}') from None
  _restore_locations(config, json.loads(text).get('provenance', {}))
  return config


def saved_values(path, what: str = '--diff_against') -> dict:
  """The effective values of a saved run (RUN_DIR or RUN_DIR/config.json): the
  `cli.EFFECTIVE` file it wrote beside its config, or for a run without one, those of its
  config.json under the defaults of the code as it is now."""
  from lib import paths

  given = paths.resolve(path, what)
  folder = given if given.is_dir() else given.parent
  effective = folder / cli.EFFECTIVE
  if (given.is_dir() or given.name == 'config.json') and effective.is_file():
    try:
      return json.loads(effective.read_text())
    except json.JSONDecodeError as e:
      raise cli.UsageError(f'{effective} is not the JSON a run writes ({e}); delete it to '
                           f'compare with {folder}/config.json instead') from None
  return cli.effective_values(load_config_file(path, what))


def normalized(config: fdl.Buildable) -> fdl.Buildable:
  """The config as it would load from its saved JSON (round-trip checks)."""
  return serialization.load_json(dump_config(config), pyref_policy=ProjectImports())


# ------------------------------------------------------------------------------- export
def python_source(config: fdl.Buildable, function_name: str = 'preset') -> str:
  """Fiddle's codegen of `config` as a plain, formatted preset function."""
  source = codegen.new_codegen(config)
  module = ast.parse(source)
  for node in module.body:
    if isinstance(node, ast.FunctionDef):
      node.name = function_name
  header = '"""Exported by `launch.py --export_python`: builds the same experiment graph."""\n\n'
  return header + '\n'.join(_format(node) for node in module.body) + '\n'


def _format(node: ast.stmt) -> str:
  if not isinstance(node, ast.FunctionDef):
    return ast.unparse(node)
  body = []
  for statement in node.body:
    if isinstance(statement, ast.Return):
      body.append('  return ' + _format_expr(statement.value, 2))
    else:
      body.append('  ' + ast.unparse(statement))
  signature = ast.unparse(node).split('\n', 1)[0]
  return f'\n\n{signature}\n' + '\n'.join(body)


def _format_expr(node: ast.expr, indent: int) -> str:
  """Calls and lists whose one-line form exceeds 90 columns get one argument per line."""
  flat = ast.unparse(node)
  if len(flat) + indent <= 90:
    return flat
  pad = ' ' * (indent + 4)
  if isinstance(node, ast.Call):
    parts = [_format_expr(a, indent + 4) for a in node.args]
    parts += [f'{k.arg}={_format_expr(k.value, indent + 4)}'
              for k in node.keywords]
    return f'{ast.unparse(node.func)}(\n' + ''.join(f'{pad}{p},\n' for p in parts) + \
        ' ' * indent + ')'
  if isinstance(node, (ast.List, ast.Tuple)):
    parts = [_format_expr(e, indent + 4) for e in node.elts]
    open_, close = ('[', ']') if isinstance(node, ast.List) else ('(', ')')
    return open_ + '\n' + ''.join(f'{pad}{p},\n' for p in parts) + ' ' * indent + close
  return flat
