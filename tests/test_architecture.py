"""The import layering of ARCHITECTURE.md, read from the code itself.

Every import counts, including those inside function bodies: an import
moved into a function to dodge a loop is still a loop.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ('pipeline', 'preprocessing', 'serving', 'estimators')
# A package may import those below it (and itself).
FLOOR = {'pipeline': 0, 'preprocessing': 1, 'serving': 2, 'estimators': 3}
# The command line sits above every stage.
TOP = {'pipeline.cli', 'pipeline.commands'}


def _modules():
  for package in PACKAGES:
    for name in sorted(os.listdir(os.path.join(ROOT, package))):
      if name.endswith('.py') and name != '__init__.py':
        yield f'{package}.{name[:-3]}', os.path.join(ROOT, package, name)


def _imports(path):
  """Project modules imported anywhere in the file (module names)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      # `from pipeline import fs` imports the module pipeline.fs.
      names = [f'{node.module}.{alias.name}' for alias in node.names]
      names.append(node.module)
    else:
      continue
    for name in names:
      if name.split('.')[0] in PACKAGES and name.count('.') == 1:
        found.add(name)
  return found


GRAPH = {name: _imports(path) for name, path in _modules()}
GRAPH = {name: {d for d in deps if d in GRAPH and d != name}
         for name, deps in GRAPH.items()}


def test_the_graph_is_read():
  assert len(GRAPH) > 30
  assert 'pipeline.errors' in GRAPH['preprocessing.run']
  assert 'serving.export' in GRAPH['estimators.commands']


@pytest.mark.parametrize('module', sorted(set(GRAPH) - TOP))
def test_no_import_runs_up_a_floor(module):
  package = module.split('.')[0]
  upward = sorted(d for d in GRAPH[module]
                  if d in TOP or FLOOR[d.split('.')[0]] > FLOOR[package])
  assert not upward, f'{module} imports {upward}, above its floor'


def test_no_import_loops():
  # Tarjan's strongly connected components over module imports.
  index, low, stack, on_stack, loops = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for dep in GRAPH[node]:
      if dep not in index:
        visit(dep)
        low[node] = min(low[node], low[dep])
      elif dep in on_stack:
        low[node] = min(low[node], index[dep])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1:
        loops.append(sorted(component))

  for node in sorted(GRAPH):
    if node not in index:
      visit(node)
  assert not loops, f'import loops: {loops}'


def test_library_code_never_imports_the_command_line():
  offenders = sorted(m for m, deps in GRAPH.items()
                     if m not in TOP and deps & TOP)
  assert not offenders
