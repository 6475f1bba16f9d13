"""docs/config.md is the schema's reference: every key, with a meaning, and the file is up to date."""

import os

from lcnn_jax import config as config_lib, config_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_key_of_the_schema_has_a_meaning_in_the_reference():
  text = config_reference.reference()
  defaults = config_lib.default_config()
  keys = [s if not hasattr(sec, "items") else f"{s}.{k}" for s, sec in defaults.items()
          for k in (sec.keys() if hasattr(sec, "items") else [None])]
  for key in keys:
    prefix = f"- `{key}`: " if key == "model.dictionary" else f"- `{key}` = "
    row = next((line for line in text.splitlines() if line.startswith(prefix)), None)
    assert row is not None, key
    assert not row.endswith(":"), f"{key} has no meaning in lcnn_jax/config.py"


def test_every_models_dictionary_sizes_are_listed_with_their_meaning_and_their_earlier_names():
  lines = config_reference.reference().splitlines()
  for lcnn, cnn in config_lib.BASELINES.items():
    start = lines.index(f"  - `{lcnn}` (and `{cnn}`):")
    rows = lines[start + 1:start + 1 + len(config_lib.DICTIONARIES[lcnn])]
    for row, (key, (default, meaning)) in zip(rows, config_lib.DICTIONARIES[lcnn].items()):
      assert row.startswith(f"    - `model.dictionary.{key}` = `{default!r}`: {meaning} Was `model."), row


def test_docs_config_md_is_generated_from_the_current_schema():
  with open(os.path.join(REPO, "docs", "config.md")) as f:
    assert f.read() == config_reference.reference(), "run: python -m lcnn_jax.config_reference > docs/config.md"
