"""The reference of every config key, generated from the schema (:func:`lcnn_jax.config.default_config` and its
comments, each model's registration in :data:`lcnn_jax.config.FAMILIES`) and the presets' docstrings:
``python -m lcnn_jax.config_reference > docs/config.md``."""

from __future__ import annotations

import ast
import inspect
import re

import ml_collections

from lcnn_jax import config as config_lib

KEY_LINE = re.compile(r"^\s*c\.(\w+)\.(\w+) = .*?(?:  # (.*))?$")
TOP_KEY_LINE = re.compile(r"^\s*c\.(\w+) = (?!ml_collections\.ConfigDict).*?(?:  # (.*))?$")
COMMENT_LINE = re.compile(r"^\s*# (.*)$")


def reference() -> str:
  """Markdown: per section, each key with its default, its type and its meaning (the schema's comment)."""
  defaults = config_lib.default_config()
  lines = ["# Config reference", "",
           "Generated from `lcnn_jax/config.py` by `python -m lcnn_jax.config_reference > docs/config.md`; do not "
           "edit by hand. Set a key with `--config.SECTION.KEY=VALUE`; `python -m lcnn_jax.main --config FILE "
           "--print_config` prints a config with its overrides applied.", ""]
  section, pending = None, []
  for line in inspect.getsource(config_lib.default_config).splitlines():
    comment, key, top = COMMENT_LINE.match(line), KEY_LINE.match(line), TOP_KEY_LINE.match(line)
    if comment:
      pending.append(comment.group(1))
      continue
    if key:
      name, field, meaning = key.groups()
      if name != section:
        section = name
        lines += [f"## {section}", ""]
      path, value = f"{name}.{field}", defaults[name][field]
    elif top:
      field, meaning = top.groups()
      path, value = field, defaults[field]
    else:
      continue
    if meaning is None and pending:  # a comment above a key without its own is that key's meaning
      meaning, pending = " ".join(pending), []
    elif pending:  # a note on the keys that follow
      lines += ["", " ".join(pending), ""]
      pending = []
    if isinstance(value, ml_collections.ConfigDict):
      lines += [f"- `{path}`: {meaning}", *models_reference()]
      continue
    kind = type(value).__name__ if value is not None else "tuple (unset)"
    lines.append(f"- `{path}` = `{value!r}` ({kind}): {meaning or ''}".rstrip())
  return "\n".join(lines + presets_reference()).replace("\n## ", "\n\n## ") + "\n"


def presets_reference() -> list[str]:
  """Markdown lines: each preset with the first paragraph of its docstring, its variants and the earlier names."""
  lines = ["## Presets", "", "Run configs by name from any directory, `--config NAME` (the family's first variant) or "
           "`--config NAME:VARIANT`; they are the files of `lcnn_jax/configs/`, one per family of runs. The earlier "
           "names and paths load the same configs: "
           f"{', '.join(f'`{old}` (`configs/{old}.py`) is `{new}`' for old, new in config_lib.RENAMED_PRESETS.items())}"
           ".", ""]
  for name in (name for name in config_lib.presets() if ":" not in name):
    with open(config_lib.resolve(name)) as f:
      summary = (ast.get_docstring(ast.parse(f.read())) or "").split("\n\n")[0].replace("\n", " ").replace("``", "`")
    lines.append(f"- `{name}` (`lcnn_jax/configs/{name}.py`): {summary}")
    lines += [f"  - `{name}:{variant}`{f' (`{name}`)' if i == 0 else ''}: {what}."
              for i, (variant, what) in enumerate(config_lib.variants(name).items())]
  return lines


def models_reference() -> list[str]:
  """Markdown lines: each model's own keys and its ``model.dictionary`` keys, their defaults and meanings."""
  lines = ["", "  Each model takes the keys above and its own, listed here with its dictionary sizes; its CNN twin takes "
           "the same and ignores the dictionary sizes (it is the LCNN with every layer dense). A key of another "
           "model, or a flat key of earlier versions (`model.pool_size`, ...), is an error naming its owner or "
           "today's key. A size of 0 keeps those layers dense (the first layer's must be > 0); a run saved with the "
           "flat keys is read back as today's, with a logged note.", ""]
  renamed = {}
  for old, new in config_lib.RENAMED.items():
    renamed.setdefault(new, []).append(f"`model.{old}`")
  for family in config_lib.FAMILIES:
    lines.append(f"  - `{family.lcnn}` (and `{family.cnn}`):")
    for key, (default, meaning) in family.keys.items():
      lines.append(f"    - `model.{key}` = `{default!r}` ({type(default).__name__}): {meaning}")
    for key, (default, meaning) in family.dictionary.items():
      was = f" Was {' and '.join(renamed[f'dictionary.{key}'])}."
      lines.append(f"    - `model.dictionary.{key}` = `{default!r}`: {meaning}{was}")
  return lines + [""]


if __name__ == "__main__":
  print(reference(), end="")
