"""docs/config.md is the schema's reference: every key, with a meaning, and the file is up to date."""

import os

from lcnn_jax import config as config_lib, config_reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_key_of_every_model_has_a_meaning_in_the_reference():
  lines = [line.strip() for line in config_reference.reference().splitlines()]
  for model in config_lib.model_names():
    defaults = config_lib.default_config(model)
    keys = [s if not hasattr(sec, "items") else f"{s}.{k}" for s, sec in defaults.items()
            for k in (sec.keys() if hasattr(sec, "items") else [None])]
    for key in keys:
      prefix = f"- `{key}`: " if key == "model.dictionary" else f"- `{key}` = "
      row = next((line for line in lines if line.startswith(prefix)), None)
      assert row is not None, key
      assert not row.endswith(":"), f"{key} has no meaning in lcnn_jax/config.py"


def test_every_models_own_keys_and_dictionary_sizes_are_listed_under_it_with_their_meaning():
  lines = config_reference.reference().splitlines()
  for family in config_lib.FAMILIES:
    start = lines.index(f"  - `{family.lcnn}` (and `{family.cnn}`):")
    rows = lines[start + 1:start + 1 + len(family.keys) + len(family.dictionary)]
    for row, (key, (default, meaning)) in zip(rows, family.keys.items()):
      assert row == f"    - `model.{key}` = `{default!r}` ({type(default).__name__}): {meaning}", row
    for row, (key, (default, meaning)) in zip(rows[len(family.keys):], family.dictionary.items()):
      assert row.startswith(f"    - `model.dictionary.{key}` = `{default!r}`: {meaning} Was `model."), row


def test_every_preset_and_variant_is_listed():
  text = config_reference.reference()
  for name in config_lib.presets():
    family, _, variant = name.partition(":")
    assert f"- `{family}` (`lcnn_jax/configs/{family}.py`): " in text, name
    if variant:
      assert f"  - `{name}`: " in text, name


def test_docs_config_md_is_generated_from_the_current_schema():
  with open(os.path.join(REPO, "docs", "config.md")) as f:
    assert f.read() == config_reference.reference(), "run: python -m lcnn_jax.config_reference > docs/config.md"
