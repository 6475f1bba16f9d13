"""Imports flow one way: every lcnn_jax import, at module level, inside a function or in an
``if __name__ == "__main__":`` block, goes down the layer table; and tests share helpers through tests/helpers.py.

The table below is the one declaration of the order (docs/architecture.md shows it). A module may import
modules of its own row and of the rows above it, never one below, and no chain of imports may come back to
where it started. A module's ``__main__`` block counts as the module's own code: ``python -m <module>`` runs the
module's file, so a command that closes a circle from there closes it for every reader of the module.
"""

import ast
import pathlib


PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "lcnn_jax"
TESTS_DIR = pathlib.Path(__file__).resolve().parent

# Rows in import order: each row may import itself and the rows above it. "pkg.*" is a package with every
# module under it; a module takes the most specific entry that names it.
LAYERS = (
    ("config", ("lcnn_jax", "lcnn_jax.cli", "lcnn_jax.config", "lcnn_jax.config_reference", "lcnn_jax.configs.*")),
    ("data", ("lcnn_jax.data.*",)),
    ("lookups", ("lcnn_jax.lookups",)),
    ("inference run time", ("lcnn_jax.inference", "lcnn_jax.inference.allocator", "lcnn_jax.inference.backends",
                            "lcnn_jax.inference.chain", "lcnn_jax.inference.flat_s", "lcnn_jax.inference.graph",
                            "lcnn_jax.inference.kernels",
                            "lcnn_jax.inference.layouts", "lcnn_jax.inference.machine", "lcnn_jax.inference.model",
                            "lcnn_jax.inference.pallas_lookup", "lcnn_jax.inference.passes",
                            "lcnn_jax.inference.precision", "lcnn_jax.inference.records", "lcnn_jax.inference.storage",
                            "lcnn_jax.inference.tuning")),
    ("layers, models", ("lcnn_jax.layers", "lcnn_jax.models.*")),
    ("sparsity, counter, optimizer", ("lcnn_jax.sparsity", "lcnn_jax.convert", "lcnn_jax.counting",
                                      "lcnn_jax.operating_point", "lcnn_jax.optimizer")),
    ("checkpoint", ("lcnn_jax.checkpoint",)),
    ("train", ("lcnn_jax.train", "lcnn_jax.logger")),
    ("inspect | export", ("lcnn_jax.inspection", "lcnn_jax.flops", "lcnn_jax.inference.*")),
    ("commands", ("lcnn_jax.main", "lcnn_jax.bench", "lcnn_jax.throughput", "lcnn_jax.devicecheck",
                  "lcnn_jax.import_t7", "lcnn_jax.experiments.*")),
)


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, pathlib.Path]:
  return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def layer_of(module: str) -> int:
  """The row of ``module`` in LAYERS (the most specific entry naming it); a module in no row fails the test."""
  best, best_length = None, -1
  for row, (_, patterns) in enumerate(LAYERS):
    for pattern in patterns:
      if pattern.endswith(".*"):
        prefix = pattern[:-2]
        matches = module == prefix or module.startswith(prefix + ".")
      else:
        matches = module == pattern
      if matches and len(pattern) > best_length:
        best, best_length = row, len(pattern)
  if best is None:
    raise AssertionError(f"{module} is in no row of LAYERS (tests/test_architecture.py): add it to the row of "
                         "what it does, and to the table in docs/architecture.md.")
  return best


def _imported(node: ast.AST, importer: str, is_package: bool, modules: set[str]) -> list[tuple[str, int]]:
  """The lcnn_jax modules one import statement loads, with its line."""
  if isinstance(node, ast.Import):
    names = [alias.name for alias in node.names]
  elif isinstance(node, ast.ImportFrom):
    if node.level:  # relative: from the importer's package
      package = importer if is_package else importer.rpartition(".")[0]
      for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
      base = f"{package}.{node.module}" if node.module else package
    else:
      base = node.module or ""
    # `from pkg import name` loads pkg.name when that is a module, else pkg itself.
    names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
  else:
    return []
  found = []
  for name in names:
    while name and name not in modules:  # `import lcnn_jax.a.b.attr` style: the longest module prefix
      name = name.rpartition(".")[0]
    if name and (name == "lcnn_jax" or name.startswith("lcnn_jax.")):
      found.append((name, node.lineno))
  return found


def module_imports(tree: ast.Module, name: str, is_package: bool, modules: set[str]) -> dict[str, int]:
  """{lcnn_jax module: first line} of every import anywhere in one module's code: at module level, in a function
  and in its ``if __name__ == "__main__":`` block alike."""
  found: dict[str, int] = {}
  for node in ast.walk(tree):
    for imported, line in _imported(node, name, is_package, modules):
      if imported != name:
        found[imported] = min(line, found.get(imported, line))
  return found


def import_graph() -> dict[str, dict[str, int]]:
  """importer -> {imported module: first line}, for every lcnn_jax import anywhere in each module's code."""
  modules = all_modules()
  return {name: module_imports(ast.parse(path.read_text(), filename=str(path)), name, path.name == "__init__.py",
                               set(modules))
          for name, path in modules.items()}


def upward_imports(graph) -> list[str]:
  return [f"{importer} (row '{LAYERS[layer_of(importer)][0]}') imports {imported} (row "
          f"'{LAYERS[layer_of(imported)][0]}', below it) at line {line}"
          for importer, targets in sorted(graph.items()) for imported, line in sorted(targets.items())
          if layer_of(imported) > layer_of(importer)]


def cycles(graph) -> list[list[str]]:
  """Every strongly connected group of more than one module, each as one cycle through it."""
  index, low, stack, on_stack, groups = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for target in graph.get(node, {}):
      if target not in index:
        visit(target)
        low[node] = min(low[node], low[target])
      elif target in on_stack:
        low[node] = min(low[node], index[target])
    if low[node] == index[node]:
      group = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        group.append(member)
        if member == node:
          break
      if len(group) > 1:
        groups.append(sorted(group))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return [_cycle_through(graph, group) for group in groups]


def _cycle_through(graph, group: list[str]) -> list[str]:
  """A path start -> ... -> start inside one strongly connected group (breadth first, so a shortest one)."""
  start, members = group[0], set(group)
  parents, frontier = {start: None}, [start]
  while frontier:
    following = []
    for node in frontier:
      for target in sorted(graph.get(node, {})):
        if target == start:
          path = [node]
          while parents[path[-1]] is not None:
            path.append(parents[path[-1]])
          return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, node, start]
        if target in members and target not in parents:
          parents[target] = node
          following.append(target)
    frontier = following
  return group


def test_every_module_has_a_row():
  for module in all_modules():
    layer_of(module)


def test_imports_flow_one_way_down_the_layer_table():
  problems = upward_imports(import_graph())
  assert not problems, ("Imports against the layer order (tests/test_architecture.py LAYERS, "
                        "docs/architecture.md):\n  " + "\n  ".join(problems))


def test_no_import_cycle_even_through_function_level_imports():
  found = cycles(import_graph())
  assert not found, "Import cycles:\n  " + "\n  ".join(" -> ".join(cycle) for cycle in found)


def test_the_checks_see_function_level_and_main_block_imports_cycles_and_upward_imports():
  """The checker itself: imports in a function and in a ``__main__`` block are the module's own (as the tree once
  had: a checkpoint function importing train, a counter whose ``__main__`` block started the inspection)."""
  modules = set(all_modules())
  source = ("def f():\n  from lcnn_jax import train\n  return train\n\n"
            'if __name__ == "__main__":\n  from lcnn_jax import inspection\n  inspection.main()\n')
  assert module_imports(ast.parse(source), "lcnn_jax.checkpoint", False, modules) == {
      "lcnn_jax.train": 2, "lcnn_jax.inspection": 6}
  graph = {"lcnn_jax.train": {"lcnn_jax.checkpoint": 1}, "lcnn_jax.checkpoint": {"lcnn_jax.train": 2},
           "lcnn_jax.counting": {"lcnn_jax.inspection": 3}, "lcnn_jax.inspection": {"lcnn_jax.counting": 4}}
  assert cycles(graph) == [["lcnn_jax.checkpoint", "lcnn_jax.train", "lcnn_jax.checkpoint"],
                           ["lcnn_jax.counting", "lcnn_jax.inspection", "lcnn_jax.counting"]]
  assert [p.split(" ")[0] for p in upward_imports(graph)] == ["lcnn_jax.checkpoint", "lcnn_jax.counting"]


# The private names test modules still import from other test modules, each as (importer, imported, name). They are
# in files others are editing now; the names stay importable from their old homes (tests/test_inference.py,
# tests/test_onnx.py re-export them from tests/helpers.py). When a file reads them from tests/helpers.py, its
# entries go; none is added.
PRIVATE_IMPORTS_LEFT = {
    ("test_kernels", "test_batch1", "_model"),
}


def private_test_imports(tree: ast.Module, importer: str, test_modules: set[str]) -> set[tuple[str, str, str]]:
  """(importer, test module, private name) for each ``_name`` one test module takes from another test module or
  conftest: ``from test_x import _name`` (or ``tests.test_x``), or ``import test_x`` and then ``test_x._name``."""
  def test_module(name: str | None) -> str | None:
    name = (name or "").removeprefix("tests.")
    return name if name in test_modules and name != importer else None

  found, aliases = set(), {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and test_module(node.module):
      found |= {(importer, test_module(node.module), alias.name) for alias in node.names
                if alias.name.startswith("_")}
    elif isinstance(node, ast.Import):
      aliases.update({alias.asname or alias.name: test_module(alias.name) for alias in node.names
                      if test_module(alias.name)})
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
        and node.attr.startswith("_")):
      found.add((importer, aliases[node.value.id], node.attr))
  return found


def test_tests_share_helpers_through_helpers_py_not_each_others_private_names():
  paths = sorted(TESTS_DIR.glob("*.py"))
  test_modules = {path.stem for path in paths if path.stem.startswith("test_") or path.stem == "conftest"}
  found = set().union(*(private_test_imports(ast.parse(path.read_text(), filename=str(path)), path.stem, test_modules)
                        for path in paths))
  new, gone = sorted(found - PRIVATE_IMPORTS_LEFT), sorted(PRIVATE_IMPORTS_LEFT - found)
  assert not new, ("A test imports another test module's private names: move them to tests/helpers.py and import "
                   "them from there:\n  " + "\n  ".join(f"tests/{a}.py: {name} from {b}" for a, b, name in new))
  assert not gone, ("These imports are gone: remove them from PRIVATE_IMPORTS_LEFT (tests/test_architecture.py), and "
                    "the old homes' re-exports no one reads any more:\n  "
                    + "\n  ".join(f"tests/{a}.py: {name} from {b}" for a, b, name in gone))


def test_the_private_import_check_sees_from_imports_module_attributes_and_conftest():
  source = ("from test_inference import _model, LAYER_CASES\nfrom tests.test_onnx import _Between\n"
            "import conftest\nimport helpers\nconftest._hang(helpers._private)\n")
  assert private_test_imports(ast.parse(source), "test_x", {"test_inference", "test_onnx", "conftest", "test_x"}) == {
      ("test_x", "test_inference", "_model"), ("test_x", "test_onnx", "_Between"), ("test_x", "conftest", "_hang")}
