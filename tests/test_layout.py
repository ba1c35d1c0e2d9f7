"""Every import points down: no cycle among the modules of lib/ and experiments/, and lib never
imports experiments (the presets, and the diffuse_nnx converter beside them, build on lib).
Tests that start an interpreter are marked `slow`.

The graph is read from the code's text (ast), module-level and in-function imports alike, so a
cycle hidden inside a function counts too.
"""

import ast
import os

from lib.config import REPO_ROOT

PACKAGES = ('lib', 'experiments')


def modules(root: str) -> dict[str, str]:
  """Dotted name -> file of every module under `root`/lib and `root`/experiments (a package is
  named by its folder)."""
  found = {}
  for package in PACKAGES:
    for folder, _, names in os.walk(os.path.join(root, package)):
      for name in names:
        if name.endswith('.py'):
          path = os.path.join(folder, name)
          dotted = os.path.relpath(path, root)[:-3].replace(os.sep, '.')
          found[dotted.removesuffix('.__init__')] = path
  return found


def imports(root: str) -> dict[str, set[str]]:
  """Module -> the project modules it imports. `from package import name` is an edge to
  `package.name` when that is a module, else to `package`; the importer's own packages (always
  imported before it) are not edges."""
  known = modules(root)
  graph = {}
  for module, path in known.items():
    package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
    targets = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
      if isinstance(node, ast.Import):
        targets.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          parent = package.split('.')[:len(package.split('.')) - node.level + 1]
          base = '.'.join(parent + ([base] if base else []))
        targets.update(f'{base}.{alias.name}' if f'{base}.{alias.name}' in known else base
                       for alias in node.names)
    graph[module] = set()
    for target in targets:
      while target and target not in known:
        target = target.rpartition('.')[0]
      if target and target != module and not module.startswith(target + '.'):
        graph[module].add(target)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(module):
    index[module] = low[module] = len(index)
    stack.append(module)
    on_stack.add(module)
    for target in sorted(graph[module]):
      if target not in index:
        visit(target)
        low[module] = min(low[module], low[target])
      elif target in on_stack:
        low[module] = min(low[module], index[target])
    if low[module] == index[module]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == module:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for module in sorted(graph):
    if module not in index:
      visit(module)
  return sorted(components)


def describe(component: list[str], graph: dict[str, set[str]]) -> str:
  """'a -> b, b -> a': the imports inside one cycle."""
  return ', '.join(f'{a} -> {b}' for a in component for b in sorted(graph[a]) if b in component)


def test_no_import_cycle():
  graph = imports(REPO_ROOT)
  found = cycles(graph)
  assert not found, 'import cycles:\n' + '\n'.join(describe(c, graph) for c in found)


def test_lib_never_imports_experiments():
  graph = imports(REPO_ROOT)
  upward = sorted(f'{module} -> {target}' for module, targets in graph.items()
                  if module.startswith('lib.') for target in targets
                  if target.split('.')[0] == 'experiments')
  assert not upward, 'lib imports experiments:\n' + '\n'.join(upward)


def test_the_graph_reader_sees_imports_and_cycles(tmp_path):
  """The checks above can fail: relative, absolute and in-function imports are edges, and a
  cycle through them is found."""
  graph = imports(REPO_ROOT)
  assert 'experiments.common' in graph['experiments.dit']
  assert {'lib.errors', 'lib.paths'} <= graph['lib.data.latents'] | graph['lib.paths']
  for package in PACKAGES:
    (tmp_path / package).mkdir()
    (tmp_path / package / '__init__.py').write_text('')
  (tmp_path / 'lib' / 'a.py').write_text('from . import b\n')
  (tmp_path / 'lib' / 'b.py').write_text('def f():\n  import lib.c\n')
  (tmp_path / 'lib' / 'c.py').write_text('from lib.a import thing\nfrom experiments import x\n')
  (tmp_path / 'experiments' / 'x.py').write_text('import os\n')
  graph = imports(str(tmp_path))
  assert graph['lib.c'] == {'lib.a', 'experiments.x'} and graph['experiments.x'] == set()
  assert cycles(graph) == [['lib.a', 'lib.b', 'lib.c']]
  assert describe(['lib.a', 'lib.b', 'lib.c'], graph) == \
      'lib.a -> lib.b, lib.b -> lib.c, lib.c -> lib.a'


# ------------------------------------------------------------------------------- tests
def unmarked_spawning_tests(path: str) -> list[str]:
  """Tests of the file `path` that start an interpreter (`sys.executable`, or `launch` of
  tests/conftest.py), directly or through the file's functions and fixtures, without the
  `slow` mark on themselves or on the module (`pytestmark`)."""
  tree = ast.parse(open(path).read(), path)
  functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}

  def direct(function) -> bool:
    for node in ast.walk(function):
      if isinstance(node, ast.Attribute) and ast.unparse(node) in ('sys.executable',
                                                                   'conftest.launch'):
        return True
      if isinstance(node, ast.Call) and ast.unparse(node.func) == 'launch' and \
          'launch' not in functions:
        return True
    return False

  spawning = {name for name, function in functions.items() if direct(function)}
  while True:  # through the file's helpers and fixtures
    more = {name for name, function in functions.items() if name not in spawning and (
        {n.id for n in ast.walk(function) if isinstance(n, ast.Name)}
        | {a.arg for a in function.args.args}) & spawning}
    if not more:
      break
    spawning |= more
  module_mark = any(isinstance(node, ast.Assign) and 'pytestmark' in ast.unparse(node.targets[0])
                    and 'slow' in ast.unparse(node.value) for node in tree.body)
  return [] if module_mark else sorted(
      name for name in spawning if name.startswith('test_')
      and not any('slow' in ast.unparse(d) for d in functions[name].decorator_list))


def test_tests_that_start_interpreters_are_marked_slow(tmp_path):
  folder = os.path.join(REPO_ROOT, 'tests')
  files = sorted(os.path.relpath(os.path.join(root, name), folder)
                 for root, _, names in os.walk(folder) for name in names
                 if name.startswith('test_') and name.endswith('.py'))
  assert len(files) > 30 and 'models/test_dit.py' in files  # the walk reaches the packages
  unmarked = {name: tests for name in files
              for tests in [unmarked_spawning_tests(os.path.join(folder, name))] if tests}
  assert not unmarked, f'mark these @pytest.mark.slow: {unmarked}'
  example = tmp_path / 'test_example.py'
  example.write_text('import sys\nimport pytest\nfrom tests.conftest import launch\n'
                     'def run():\n  return launch("--help")\n'
                     'def test_a():\n  run()\n'
                     '@pytest.mark.slow\ndef test_b():\n  run()\n'
                     'def test_c(fixture):\n  pass\n'
                     'def fixture():\n  return [sys.executable]\n'
                     'def test_d():\n  pass\n')
  assert unmarked_spawning_tests(str(example)) == ['test_a', 'test_c']
