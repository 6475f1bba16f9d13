"""Imports flow one way: every lcnn_jax import, at module level or inside a function, goes down the layer table.

The table below is the one declaration of the order (docs/architecture.md shows it). A module may import
modules of its own row and of the rows above it, never one below, and no chain of imports may come back to
where it started. A module's ``if __name__ == "__main__":`` block is the program ``python -m <module>``, not part
of the module: nothing imports it, and it sits in the last row (a counter module may start the inspection
command without importing it).
"""

import ast
import pathlib


PACKAGE_DIR = pathlib.Path(__file__).resolve().parent.parent / "lcnn_jax"

# Rows in import order: each row may import itself and the rows above it. "pkg.*" is a package with every
# module under it; a module takes the most specific entry that names it.
LAYERS = (
    ("config", ("lcnn_jax", "lcnn_jax.cli", "lcnn_jax.config", "lcnn_jax.config_reference", "lcnn_jax.configs.*")),
    ("data", ("lcnn_jax.data.*",)),
    ("lookups", ("lcnn_jax.lookups",)),
    ("inference run time", ("lcnn_jax.inference", "lcnn_jax.inference.allocator", "lcnn_jax.inference.backends",
                            "lcnn_jax.inference.chain", "lcnn_jax.inference.graph", "lcnn_jax.inference.kernels",
                            "lcnn_jax.inference.layouts", "lcnn_jax.inference.model", "lcnn_jax.inference.pallas_lookup",
                            "lcnn_jax.inference.passes", "lcnn_jax.inference.precision", "lcnn_jax.inference.records", "lcnn_jax.inference.storage",
                            "lcnn_jax.inference.tuning")),
    ("layers, models", ("lcnn_jax.layers", "lcnn_jax.models.*")),
    ("sparsity, counter, optimizer", ("lcnn_jax.sparsity", "lcnn_jax.convert", "lcnn_jax.flops",
                                      "lcnn_jax.operating_point", "lcnn_jax.optimizer")),
    ("checkpoint", ("lcnn_jax.checkpoint",)),
    ("train", ("lcnn_jax.train", "lcnn_jax.logger")),
    ("inspect | export", ("lcnn_jax.inspection", "lcnn_jax.inference.*")),
    ("commands", ("lcnn_jax.main", "lcnn_jax.bench", "lcnn_jax.throughput", "lcnn_jax.devicecheck",
                  "lcnn_jax.import_t7", "lcnn_jax.experiments.*", "python -m *")),
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
      if pattern.endswith(".*") or pattern.endswith(" *"):
        prefix = pattern[:-2]
        matches = module == prefix or module.startswith(prefix + (" " if pattern.endswith(" *") else "."))
      else:
        matches = module == pattern
      if matches and len(pattern) > best_length:
        best, best_length = row, len(pattern)
  if best is None:
    raise AssertionError(f"{module} is in no row of LAYERS (tests/test_architecture.py): add it to the row of "
                         "what it does, and to the table in docs/architecture.md.")
  return best


def _is_main_guard(node: ast.stmt) -> bool:
  return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
          and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
          and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


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


def import_graph() -> dict[str, dict[str, int]]:
  """importer -> {imported module: first line}, for every lcnn_jax import anywhere in each module's code; the
  imports of a ``__main__`` block belong to the importer "python -m <module>"."""
  modules = all_modules()
  graph: dict[str, dict[str, int]] = {}
  for name, path in modules.items():
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    program = f"python -m {name}"
    guarded = {id(n) for stmt in tree.body if _is_main_guard(stmt) for n in ast.walk(stmt)}
    for node in ast.walk(tree):
      importer = program if id(node) in guarded else name
      for imported, line in _imported(node, name, is_package, set(modules)):
        if imported != name:
          graph.setdefault(importer, {}).setdefault(imported, line)
    graph.setdefault(name, {})
  return graph


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


def test_the_checks_see_function_level_imports_cycles_and_upward_imports():
  """The checker itself, on a graph with a function-level cycle and an upward import (as the tree once had)."""
  source = "def f():\n  from lcnn_jax import train\n  return train\n"
  nodes = list(ast.walk(ast.parse(source)))
  modules = set(all_modules())
  assert [name for node in nodes for name, _ in _imported(node, "lcnn_jax.checkpoint", False, modules)] == [
      "lcnn_jax.train"]
  graph = {"lcnn_jax.train": {"lcnn_jax.checkpoint": 1}, "lcnn_jax.checkpoint": {"lcnn_jax.train": 2},
           "lcnn_jax.flops": {"lcnn_jax.inspection": 3}}
  assert cycles(graph) == [["lcnn_jax.checkpoint", "lcnn_jax.train", "lcnn_jax.checkpoint"]]
  assert [p.split(" ")[0] for p in upward_imports(graph)] == ["lcnn_jax.checkpoint", "lcnn_jax.flops"]
  main_guard = ast.parse('if __name__ == "__main__":\n  from lcnn_jax import inspection\n').body[0]
  assert _is_main_guard(main_guard) and layer_of("python -m lcnn_jax.flops") == len(LAYERS) - 1
