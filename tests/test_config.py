"""Specification of lcnn_jax.config: the schema per model, its checks, the earlier flat keys, saved configs and the
presets (by path or by name, shipped inside the package)."""

import configparser
import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import pytest
import setuptools
from ml_collections import config_flags

from lcnn_jax import checkpoint, cli
from lcnn_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config_command(argv):
  """A command with one config flag, parsed as every lcnn_jax command is; returns (status, config or None)."""
  seen = {}

  def define_flags(flag_values):
    config_flags.DEFINE_config_file("config", None, "The run config.", flag_values=flag_values)

  def main(argv, flag_values):
    seen["config"] = flag_values.config

  status = cli.call(main, define_flags, ["prog", *argv])
  return status, seen.get("config")


def write_config(tmp_path, body, name="my_config.py"):
  path = tmp_path / name
  path.write_text("from lcnn_jax import config as config_lib\n\n\ndef get_config():\n" + body)
  return str(path)


# ------------------------------------------------------------------------------------------------ schema


@pytest.mark.parametrize("model, keys", [
    ("alexnet-lcnn", ["first", "convs", "fc", "classifier"]),
    ("alexnet", ["first", "convs", "fc", "classifier"]),
    ("resnet-lcnn", ["first", "stage1", "stage2", "stage3", "stage4"]),
    ("digits-lcnn", ["first", "convs", "classifier"]),
    ("mnist", ["first", "convs", "classifier"]),
])
def test_each_model_has_its_own_dictionary_sizes_in_the_papers_words(model, keys):
  config = config_lib.default_config(model)
  assert config.model.name == model and sorted(config.model.dictionary) == sorted(keys)
  config_lib.validate(config)


def test_an_unknown_model_name_lists_the_models():
  with pytest.raises(ValueError, match=r"model.name='vgg'.*alexnet-lcnn.*resnet-lcnn"):
    config_lib.default_config("vgg")


def test_convs_takes_one_size_or_one_per_convolution():
  config = config_lib.default_config("alexnet-lcnn")
  config.model.dictionary.convs = (500, 500, 500, 30)
  config_lib.validate(config)
  config.model.dictionary.convs = 8
  config_lib.validate(config)


@pytest.mark.parametrize("key, value, message", [
    ("first", 0, r"model.dictionary.first=0: the first layer's dictionary size must be > 0"),
    ("convs", -1, r"model.dictionary.convs=-1: a dictionary size must be > 0"),
    ("convs", (30, 0, 30, 30), r"model.dictionary.convs=\(30, 0, 30, 30\): a dictionary size must be > 0"),
    ("convs", "abc", r"model.dictionary.convs='abc': a dictionary size is a whole number of atoms"),
    ("fc", -2, r"model.dictionary.fc=-2"),
])
def test_a_value_that_is_not_a_dictionary_size_is_named(key, value, message):
  config = config_lib.default_config("alexnet-lcnn")
  with config.model.dictionary.ignore_type():
    config.model.dictionary[key] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_a_dictionary_size_of_another_model_names_the_key_the_model_and_its_keys():
  config = config_lib.default_config("alexnet-lcnn")
  config.model.dictionary.stage1 = 6
  with pytest.raises(ValueError, match=r"model.dictionary.stage1 is a dictionary size of resnet-lcnn, not of "
                                       r"alexnet-lcnn\. alexnet-lcnn takes model.dictionary.\{first, convs, fc, "
                                       r"classifier\}"):
    config_lib.validate(config)


def test_changing_the_model_in_a_file_without_its_dictionary_names_what_is_missing_and_the_fix():
  config = config_lib.default_config()  # digits-lcnn
  config.model.name = "resnet-lcnn"
  with pytest.raises(ValueError) as e:
    config_lib.validate(config)
  message = str(e.value)
  assert "model.dictionary.convs is a dictionary size of alexnet-lcnn, digits-lcnn, mnist-lcnn" in message
  assert "model.dictionary.stage1 is missing" in message
  assert "default_config('resnet-lcnn')" in message


def test_a_misspelt_key_set_in_a_file_is_named():
  config = config_lib.default_config()
  config.train.batchsize = 64
  with pytest.raises(ValueError, match="there is no config key train.batchsize"):
    config_lib.check_keys(config)


@pytest.mark.parametrize("model, own", [
    ("alexnet-lcnn", ["dropout"]), ("alexnet", ["dropout"]), ("resnet-lcnn", ["depth"]), ("resnet", ["depth"]),
    ("digits-lcnn", ["dropout", "width", "convs_per_stage", "head"]),
    ("mnist", ["dropout", "width", "convs_per_stage", "head"]),
])
def test_each_model_has_the_common_keys_and_its_own(model, own):
  assert sorted(config_lib.default_config(model).model) == sorted(["name", "initial_sparsity", "dictionary", *own])


@pytest.mark.parametrize("model, key, value, owners", [
    ("alexnet-lcnn", "depth", 34, "resnet-lcnn, resnet"),
    ("resnet-lcnn", "width", 8, "digits-lcnn, digits, mnist-lcnn, mnist"),
    ("resnet", "dropout", 0.1, "alexnet-lcnn, alexnet, digits-lcnn, digits, mnist-lcnn, mnist"),
])
def test_a_key_of_another_model_set_in_a_file_names_its_owners_and_the_models_keys(model, key, value, owners):
  config = config_lib.default_config(model)
  config.model[key] = value
  with pytest.raises(ValueError, match=rf"model.{key} is a key of {owners}, not of {model}\. {model} takes "
                                       r"model.dictionary.\{"):
    config_lib.validate(config)


def test_a_key_of_another_model_on_the_command_line_is_a_usage_error_naming_its_owner(capsys):
  status, _ = run_config_command(["--config", "alexnet:fast", "--config.model.depth=34"])
  err = capsys.readouterr().err
  assert status == 2 and "Traceback" not in err
  assert err.startswith("error: --config.model.depth: model.depth is a key of resnet-lcnn, resnet, not of "
                        "alexnet-lcnn. The config's model alexnet-lcnn takes model.dictionary.{first, convs, fc, "
                        "classifier} and model.dropout; docs/config.md lists every model's keys")
  status, _ = run_config_command(["--config", "resnet18", "--config.model.head=flatten"])
  err = capsys.readouterr().err
  assert status == 2 and "model.head is a key of digits-lcnn, digits, mnist-lcnn, mnist, not of resnet." in err


def test_a_misspelt_model_key_on_the_command_line_is_a_usage_error(capsys):
  status, _ = run_config_command(["--config", "quickstart", "--config.model.widht=8"])
  err = capsys.readouterr().err
  assert status == 2 and err.startswith("error: --config.model.widht: there is no config key 'widht'")


@pytest.mark.parametrize("model, key, value, message", [
    ("digits-lcnn", "head", "max", r"model.head='max': expected one of \('average', 'flatten'\)"),
    ("mnist", "width", 0, r"model.width=0, model.convs_per_stage=1: the width must be positive"),
    ("alexnet-lcnn", "dropout", 1.0, r"model.dropout=1.0: must be in \[0, 1\)"),
    ("resnet-lcnn", "initial_sparsity", -0.1, r"model.initial_sparsity=-0.1: must be >= 0"),
])
def test_a_value_of_a_models_key_out_of_its_domain_is_named(model, key, value, message):
  config = config_lib.default_config(model)
  config.model[key] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_a_model_name_or_a_common_key_cannot_be_registered_twice():
  alexnet = config_lib.family("alexnet")
  with pytest.raises(ValueError, match="model.name alexnet, alexnet-lcnn: already registered"):
    config_lib.register_model(alexnet)
  with pytest.raises(ValueError, match=r"model.\{initial_sparsity\}: every model has these keys"):
    config_lib.register_model(config_lib.ModelFamily(cnn="x", lcnn="x-lcnn", builders=("m:x", "m:x_lcnn"),
                                                     keys={"initial_sparsity": (0.1, "")}, dictionary={}))
  assert [f for f in config_lib.FAMILIES if f.cnn == "x"] == []


# ------------------------------------------------------------------------------------------------ earlier keys


@pytest.mark.parametrize("model, old, new", [
    ("alexnet-lcnn", "first_pool", "dictionary.first"),
    ("alexnet-lcnn", "pool_size", "dictionary.convs"),
    ("alexnet-lcnn", "pool_sizes", "dictionary.convs"),
    ("alexnet-lcnn", "fc_pool", "dictionary.fc"),
    ("digits-lcnn", "classifier_pool", "dictionary.classifier"),
    ("resnet-lcnn", "pool3", "dictionary.stage3"),
])
def test_an_earlier_flat_key_set_in_a_config_names_todays(model, old, new):
  config = config_lib.default_config(model)
  config.model[old] = 8
  with pytest.raises(ValueError, match=rf"model.{old} was renamed model.{new} \(set model.{new} = 8\)\. {model} takes"):
    config_lib.check_keys(config)


def test_an_earlier_key_of_another_model_says_the_model_does_not_take_it():
  config = config_lib.default_config("resnet-lcnn")
  config.model.fc_pool = 512
  with pytest.raises(ValueError, match=r"model.fc_pool was renamed model.dictionary.fc, which resnet-lcnn does not "
                                       r"take\. resnet-lcnn takes model.dictionary.\{first, stage1"):
    config_lib.check_keys(config)


def test_an_earlier_key_on_the_command_line_names_todays_and_the_flag_to_pass(capsys):
  status, _ = run_config_command(["--config", "alexnet_fast", "--config.model.pool_size=8"])
  assert status == 2
  err = capsys.readouterr().err
  assert err.startswith("error: --config.model.pool_size: model.pool_size was renamed model.dictionary.convs: pass "
                        "--config.model.dictionary.convs=8. The config's model alexnet-lcnn takes "
                        "model.dictionary.{first, convs, fc, classifier}")
  assert "Traceback" not in err


def test_a_dictionary_size_of_another_model_on_the_command_line_is_a_usage_error(capsys):
  status, _ = run_config_command(["--config", "alexnet_fast", "--config.model.dictionary.stage1=6"])
  assert status == 2
  assert ("--config.model.dictionary.stage1: model.dictionary.stage1 is a dictionary size of resnet-lcnn, not of "
          "alexnet-lcnn. The config's model alexnet-lcnn takes model.dictionary.{first, convs, fc, classifier}"
          in capsys.readouterr().err)


def test_an_earlier_key_in_a_user_config_file_is_a_usage_error_naming_todays(tmp_path, capsys):
  path = write_config(tmp_path, "  c = config_lib.default_config('digits-lcnn')\n  c.model.pool_size = 8\n"
                      "  return c\n")
  status, _ = run_config_command(["--config", path])
  assert status == 2
  err = capsys.readouterr().err
  assert (f"--config {path}: model.pool_size was renamed model.dictionary.convs (set model.dictionary.convs = 8). "
          "digits-lcnn takes model.dictionary.{first, convs, classifier}") in err


def test_the_command_line_sets_a_dictionary_size_and_convs_as_one_size_or_a_tuple():
  status, config = run_config_command(["--config", "alexnet_accurate", "--config.model.dictionary.fc=64",
                                       "--config.model.dictionary.convs=(500, 500, 500, 500)"])
  assert status == 0
  assert (config.model.dictionary.fc, config.model.dictionary.convs) == (64, (500, 500, 500, 500))
  status, config = run_config_command(["--config", "alexnet_accurate", "--config.model.dictionary.convs=40"])
  assert (status, config.model.dictionary.convs) == (0, 40)


# ------------------------------------------------------------------------------------------------ saved configs


# model.* of an AlexNet-accurate run saved before model.dictionary: every model's flat keys, side by side.
FLAT_ALEXNET = {"name": "alexnet-lcnn", "depth": 18, "first_pool": 3, "pool_size": 30,
                "pool_sizes": [500, 500, 500, 30], "fc_pool": 1024, "classifier_pool": 0, "pool1": 0, "pool2": 0,
                "pool3": 0, "pool4": 0, "initial_sparsity": 0.01, "dropout": 0.5, "width": 32, "convs_per_stage": 1}


def test_a_saved_config_with_the_earlier_flat_keys_reads_as_todays_with_a_note():
  saved = config_lib.default_config("alexnet-lcnn").to_dict()
  saved["model"] = dict(FLAT_ALEXNET)
  with mock.patch.object(config_lib.logging, "info") as info:
    config = config_lib.from_dict(json.loads(json.dumps(saved, default=list)), source="RUN/config.json")
  assert config.model.dictionary.to_dict() == {"first": 3, "convs": (500, 500, 500, 30), "fc": 1024, "classifier": 0}
  config_lib.validate(config)
  assert "depth" not in config.model and "width" not in config.model  # resnet's and the small nets' keys
  note = info.call_args[0][0] % info.call_args[0][1:]
  assert note.startswith("RUN/config.json has the flat dictionary keys of earlier versions: read model.first_pool=3")
  assert "model.dictionary = {'first': 3, 'convs': (500, 500, 500, 30), 'fc': 1024, 'classifier': 0}" in note


@pytest.mark.parametrize("flat, dictionary", [
    ({"name": "digits-lcnn", "first_pool": 1, "pool_size": 8, "pool_sizes": None, "classifier_pool": 4, "fc_pool": 0,
      "pool1": 0}, {"first": 1, "convs": 8, "classifier": 4}),
    ({"name": "resnet-lcnn", "first_pool": 3, "pool_size": 30, "pool_sizes": None, "pool1": 6, "pool2": 12,
      "pool3": 24, "pool4": 48}, {"first": 3, "stage1": 6, "stage2": 12, "stage3": 24, "stage4": 48}),
    ({"name": "mnist", "first_pool": 1, "pool_size": 8}, {"first": 1, "convs": 8, "classifier": 0}),
])
def test_saved_flat_keys_keep_the_sizes_their_model_read_and_drop_the_rest(flat, dictionary):
  config = config_lib.from_dict({"model": flat})
  assert config.model.dictionary.to_dict() == dictionary


def test_a_run_saved_with_the_earlier_flat_keys_restores_its_config(tmp_path):
  saved = config_lib.default_config("alexnet-lcnn").to_dict()
  saved["model"] = dict(FLAT_ALEXNET)
  (tmp_path / "config.json").write_text(json.dumps({"config": saved, "dataset": {"num_classes": 10}}, default=list))
  config, dataset = checkpoint.load_run_info(str(tmp_path))
  assert dataset == {"num_classes": 10}
  assert tuple(config.model.dictionary.convs) == (500, 500, 500, 30) and config.model.dictionary.fc == 1024


def test_a_run_saved_today_restores_its_config(tmp_path):
  config = config_lib.load("resnet18_fast")
  checkpoint.save_run_info(str(tmp_path), config, {"num_classes": 10})
  restored, _ = checkpoint.load_run_info(str(tmp_path))
  assert restored.to_dict() == config.to_dict()


# ------------------------------------------------------------------------------------------------ presets


def test_presets_are_listed_by_name_with_their_variants_and_every_one_loads_and_validates():
  names = config_lib.presets()
  assert {"quickstart", "alexnet", "alexnet:fast", "alexnet:accurate", "resnet18", "resnet18:fast",
          "resnet18:accurate", "fashion_mnist", "fashion_mnist:lcnn", "experiments/spectrum",
          "experiments/spectrum_fashion:full"} <= set(names)
  for name in names:
    config_lib.validate(config_lib.load(name))


@pytest.mark.parametrize("name, model, target", [
    ("alexnet", "alexnet", 0.0), ("alexnet:cnn", "alexnet", 0.0), ("alexnet:fast", "alexnet-lcnn", 37.6),
    ("alexnet:accurate", "alexnet-lcnn", 3.2), ("resnet18:fast", "resnet-lcnn", 29.2),
    ("fashion_mnist:lcnn", "mnist-lcnn", 10.0), ("fashion_mnist", "mnist", 0.0),
])
def test_a_family_file_gives_each_variant_by_argument(name, model, target):
  config = config_lib.load(name)
  assert (config.model.name, config.sparsity.target_speedup) == (model, target)
  assert config_lib.resolve(name).startswith(os.path.join(config_lib.PRESET_DIR, name.partition(":")[0] + ".py"))


@pytest.mark.parametrize("old, new", list(config_lib.RENAMED_PRESETS.items()))
def test_an_earlier_preset_name_loads_todays_variant(old, new):
  assert config_lib.resolve(old) == config_lib.resolve(new)
  assert config_lib.load(old).to_dict() == config_lib.load(new).to_dict()


OLD_PATHS = sorted(os.path.relpath(os.path.join(d, f), REPO) for d, _, files in os.walk(os.path.join(REPO, "configs"))
                   for f in files if f.endswith(".py"))


def test_every_earlier_path_is_kept():
  assert {"configs/quickstart.py", "configs/alexnet_fast.py", "configs/resnet18.py", "configs/fashion_mnist_lcnn.py",
          "configs/experiments/spectrum_fashion.py"} <= set(OLD_PATHS)


@pytest.mark.parametrize("path", OLD_PATHS)
def test_an_earlier_checkout_path_loads_the_preset_of_its_name_from_any_directory(path, tmp_path, monkeypatch):
  name = path[len("configs/"):-len(".py")]
  expected = config_lib.load(name).to_dict()
  assert config_lib.load(os.path.join(REPO, path)).to_dict() == expected  # the file
  monkeypatch.chdir(tmp_path)
  assert config_lib.load(path).to_dict() == expected  # the preset of that name


def test_an_earlier_path_with_a_variant_loads_it(monkeypatch):
  monkeypatch.chdir(REPO)
  assert config_lib.load("configs/experiments/spectrum_fashion.py:full").train.num_steps == 0
  assert config_lib.load("configs/alexnet.py:fast").sparsity.target_speedup == 37.6
  status, config = run_config_command(["--config", "configs/experiments/few_shot_fashion.py:full"])
  assert status == 0 and config.train.epochs == 12


@pytest.mark.parametrize("argv", [["--config", "alexnet:fast"], ["--config=alexnet:fast"], ["--config", "alexnet_fast"],
                                  ["--config", "configs/alexnet_fast.py"]])
def test_a_preset_and_its_variant_on_the_command_line_load_from_any_directory(argv, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  status, config = run_config_command(argv)
  assert status == 0 and config.model.dictionary.convs == (30, 30, 30, 30) and config.sparsity.target_speedup == 37.6


@pytest.mark.parametrize("value, message", [
    ("alexnet:fsat", "error: --config alexnet:fsat: alexnet has no variant 'fsat'; its variants are alexnet:cnn (the "
                     "AlexNet CNN, the paper's baseline row (1.0×)), alexnet:fast ("),
    ("quickstart:full", "error: --config quickstart:full: quickstart has no variant 'full'; quickstart has no variants."),
    ("alexnet_fast:accurate", "error: --config alexnet_fast:accurate: alexnet_fast is the preset alexnet:fast; pass "
                              "--config alexnet:VARIANT for another variant."),
])
def test_an_unknown_variant_is_a_usage_error_naming_the_variants(value, message, capsys):
  status, _ = run_config_command(["--config", value])
  err = capsys.readouterr().err
  assert status == 2 and err.startswith(message), err


def test_a_misspelt_preset_is_a_usage_error_listing_the_presets(capsys):
  with pytest.raises(ValueError, match=r"--config alexnet_fats: no such file, and no preset of that name.*"
                                       r"alexnet, alexnet:accurate, alexnet:fast, experiments/few_iteration"):
    config_lib.resolve("alexnet_fats")
  status, _ = run_config_command(["--config", "alexnet_fats"])
  err = capsys.readouterr().err
  assert status == 2 and err.startswith("error: --config alexnet_fats: no such file") and "quickstart" in err


def test_the_presets_ship_inside_the_package(tmp_path):
  """The presets are a package of lcnn_jax (no mapping of another directory): building the package puts every
  preset there (the files a wheel holds; ``pip wheel . --no-deps`` shows the same list)."""
  parser = configparser.ConfigParser()
  parser.read(os.path.join(REPO, "setup.cfg"))
  assert "package_dir" not in parser["options"]
  listed = parser["options"]["packages"].split()
  assert sorted(listed) == sorted(setuptools.find_packages(REPO, include=["lcnn_jax", "lcnn_jax.*"]))
  assert {"lcnn_jax.configs", "lcnn_jax.configs.experiments"} <= set(listed)
  for name in ("setup.cfg", "pyproject.toml", "README.md"):
    shutil.copy(os.path.join(REPO, name), tmp_path)
  shutil.copytree(os.path.join(REPO, "lcnn_jax"), tmp_path / "lcnn_jax", ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py", "-d",
                  str(tmp_path / "lib")], cwd=tmp_path, check=True, capture_output=True)
  code = "from lcnn_jax import config; print(config.PRESET_DIR); print(','.join(config.presets()))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=tmp_path / "lib", env={**os.environ, "PYTHONPATH": str(tmp_path / "lib")}).stdout.splitlines()
  assert out == [str(tmp_path / "lib" / "lcnn_jax" / "configs"), ",".join(config_lib.presets())]


def test_the_schema_needs_no_model_code():
  code = ("import sys; from lcnn_jax import config; config.validate(config.load('alexnet_fast')); "
          "print(any(m.startswith('lcnn_jax.models') for m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={**os.environ, "PYTHONPATH": REPO})
  assert out.stdout.strip() == "False"


def test_a_preset_called_from_python_with_an_unknown_variant_names_its_variants():
  from lcnn_jax.configs import alexnet
  from lcnn_jax.configs.experiments import spectrum_fashion
  with pytest.raises(ValueError, match=r"alexnet:medium: expected one of cnn, fast, accurate, e.g. --config "
                                       r"alexnet:fast\."):
    alexnet.get_config("medium")
  with pytest.raises(ValueError, match="experiments/spectrum_fashion:huge: expected one of reduced, full"):
    spectrum_fashion.get_config("huge")
