"""Looking at an experiment graph before spending compute: drawings, diffs and exported
presets. Nothing here builds the experiment.

    render(config, 'graph.svg')            # also .png, .dot (Fiddle graphviz), .html (foldable tree)
    diff_lines(old, new)                   # 'network.depth: 12 -> 28'
    values_diff_lines(saved.saved_values('run'), values.effective_values(config))
    python_source(config, 'my_preset')     # a plain preset function building the same graph
"""

import ast
import html
import os
import shutil

import fiddle as fdl
from fiddle import graphviz
from fiddle.codegen import codegen

from lib.config import values
from lib.errors import UsageError

DOT_MISSING = ("graphviz's `dot` program is not installed, so only the .dot source was written; "
               "install it with `apt-get install graphviz` (Debian/Ubuntu) or "
               "`brew install graphviz` (macOS), then render with `dot -Tsvg FILE.dot -o FILE.svg`")


# ------------------------------------------------------------------------------- drawing
def render(config: fdl.Buildable, path: str, old: fdl.Buildable | None = None,
           defaults: bool = True) -> str | None:
  """Draws `config` (or its difference from `old`) to `path` by extension: .svg, .png, .dot
  or .html. With `defaults` (always for a difference) arguments left at their constructor
  defaults are drawn too (`values.with_defaults`). Shared nodes are drawn once with all their
  edges. Returns a warning when `dot` is missing (the .dot source is written beside `path`
  instead)."""
  extension = os.path.splitext(path)[1].lower()
  if defaults or old is not None:
    config = values.with_defaults(config)
  if extension == '.html':
    if old is not None:
      raise UsageError('--render=FILE.html draws one config; use .svg, .png or .dot '
                       'with --diff_against')
    with open(path, 'w') as f:
      f.write(html_tree(config))
    return None
  if extension not in ('.svg', '.png', '.dot'):
    raise UsageError(f'--render={path}: expected a .svg, .png, .dot or .html file')
  graph = graphviz.render(config) if old is None else \
      graphviz.render_diff(old=values.with_defaults(old), new=config)
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
  place its value was set (greyed, `default of TARGET`, for a default of a `values.with_defaults`
     copy). A node reached by several paths is expanded once; later occurrences link to it."""
  seen: dict[int, str] = {}

  def node_html(node, path) -> str:
    label = values.format_path(path) or 'experiment'
    if id(node) in seen:
      return (f'<li><b>{html.escape(label)}</b>: shared with '
              f'<a href="#{seen[id(node)]}">{html.escape(seen[id(node)])}</a></li>')
    anchor = seen[id(node)] = values.format_path(path) or 'experiment'
    target = values.qualified_name(fdl.get_callable(node))
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
    where = values.value_source(parent, name)
    kind = ' class="default"' if values.default_owner(parent, name) else ''
    return (f'<li{kind}><code>{html.escape(values.format_path(path))} = '
               f'{html.escape(values.leaf_repr(value))}</code>'
               f'<span class="src">{html.escape(where)}</span></li>')

  style = ('body{font-family:sans-serif} ul{list-style:none;padding-left:1.2em} '
           '.src{color:#888;margin-left:1em;font-size:85%} summary{cursor:pointer} '
           '.default code{color:#777}')
  return (f'<!doctype html><html><head><meta charset="utf-8"><title>experiment config</title>'
          f'<style>{style}</style></head><body><ul>{node_html(config, [])}</ul></body></html>\n')


# ------------------------------------------------------------------------------- diffs
def diff_lines(old: fdl.Buildable, new: fdl.Buildable) -> list[str]:
  """`values_diff_lines` of the two configs' effective values (defaults included)."""
  return values_diff_lines(values.effective_values(old), values.effective_values(new))


def values_diff_lines(old: dict, new: dict) -> list[str]:
  """`path: old -> new` for each path whose effective value (`values.effective_values`) differs,
  by path; a side that is a constructor default reads `value (default of TARGET)`, a path only
  one side has reads `(unset)` on the other:

      network.depth: 28 -> 12
      sampler.guidance_scale: 1.0 (default of lib.flow.samplers.Heun) -> 4.0 (default of ...)
  """

  def side(effective, path):
    if path not in effective:
      return '(unset)'
    owner = effective[path].get('default_of')
    return effective[path]['value'] + (f' (default of {owner})' if owner else '')

  changed = sorted(path for path in old.keys() | new.keys()
                   if old.get(path, {}).get('value') != new.get(path, {}).get('value'))
  return [f'{path}: {side(old, path)} -> {side(new, path)}' for path in changed]


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
