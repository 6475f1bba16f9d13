"""What every command of lcnn_jax shares: flags parsed with user mistakes answered in one paragraph (exit code 2,
no traceback), ``-h`` as ``--help``, and quiet logs unless ``--verbosity`` asks for more.

Every command module has one shape: ``define_flags(flag_values=flags.FLAGS)`` defines its flags (so importing the
module defines none) and ``main(argv, flag_values=flags.FLAGS)`` reads them; its ``__main__`` block calls
``define_flags()`` then ``cli.run(main, user_errors=(...))``. ``main`` raises :class:`UsageError` (or one of
``user_errors``) for a mistake of the person at the keyboard; anything else is a bug and keeps its traceback.
Every command also runs in a Python process as it would on the command line, with the same parser and a fresh set
of flags, through ``cli.call(module.main, module.define_flags, argv)``.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import re
import shlex
import signal
import sys
import tempfile
import threading
import traceback
from typing import Callable, Iterator, Sequence

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from lcnn_jax import config as config_lib

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
USAGE_EXIT = 2


class UsageError(Exception):
  """A mistake of the person running the command: printed as one paragraph, exit code 2."""


class Interrupted(Exception):
  """The command was stopped by a signal after saving what it had: exit code 128 + the signal's number."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


def fail(message: str, code: int = USAGE_EXIT) -> None:
  """Prints ``error: message`` once on stderr and exits with ``code``."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def run(main: Callable[[list[str]], object], *, user_errors: tuple[type[BaseException], ...] = ()) -> None:
  """``absl.app.run(main)``: flag and config-file mistakes, :class:`UsageError` and ``user_errors`` end in one
  paragraph with exit code 2; :class:`Interrupted` in its message and 128 + signal; a closed output pipe in exit
  code 141, silently; other errors keep their traceback."""
  try:
    app.run(main, flags_parser=parse_flags)
  except (UsageError, *user_errors) as e:
    fail(str(e))
  except Interrupted as e:
    print(str(e), file=sys.stderr)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
  except BrokenPipeError:  # the output's reader stopped (`... | head`): stop quietly, as other commands do
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
    sys.exit(128 + signal.SIGPIPE)


def call(main: Callable[..., object], define_flags: Callable[[flags.FlagValues], None], argv: Sequence[str],
         *, user_errors: tuple[type[BaseException], ...] = ()) -> int:
  """``python -m`` of a command in this process: its flags, defined by ``define_flags`` on a fresh set of flags,
  parsed from ``argv`` (the program name first) by :func:`parse_flags`, then ``main(rest, flag_values)``. Returns the
  exit status: 2 after one ``error:`` paragraph on stderr for a user mistake, as :func:`run` answers it."""
  flag_values, command_line = flags.FlagValues(), sys.argv
  sys.argv = list(argv)  # what a config flag reads its --config.<key> overrides from when defined
  try:
    define_flags(flag_values)
    rest = parse_flags(argv, flag_values)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return USAGE_EXIT
  finally:
    sys.argv = command_line
  try:
    status = main(rest, flag_values)
  except (UsageError, *user_errors) as e:
    print(f"error: {e}", file=sys.stderr)
    return USAGE_EXIT
  return int(status or 0)


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues | None = None) -> list[str]:
  """absl's flag parsing (of ``flag_values``, by default absl's global flags), with its errors (and
  ml_collections' config-file errors) turned into a :class:`UsageError` that names the flag and the fix; ``-h``
  means ``--help``."""
  flag_values = flags.FLAGS if flag_values is None else flag_values
  argv = _resolve_config_files([argv[0], *("--help" if arg == "-h" else arg for arg in argv[1:])], flag_values)
  try:
    rest = flag_values(argv)
  except SystemExit as e:  # absl's --help exits with 1 after printing the help
    if e.code == 1 and {"--help", "--helpshort", "--helpfull", "-?"} & set(argv):
      sys.exit(0)
    raise
  except flags.Error as e:
    message = str(e)
    if "Traceback (most recent call last)" in message:  # ml_collections embeds the loader's traceback
      message = f"{message.splitlines()[0]} {message.strip().splitlines()[-1]}"
    override = re.match(r"flag (--\w+\.[\w.]+=.*?): (.*)", message, re.S)
    missing = re.match(r"flag --(\w+)=None: Flag --\1 must have a value", message)
    if missing and missing.group(1) in flag_values:
      message = f"--{missing.group(1)} is missing: {flag_values[missing.group(1)].help} See --help for the flags."
    elif override:
      message = (f"{override.group(1)}: not a value this key takes ({override.group(2)}); --print_config shows "
                 "every key with its current value, docs/config.md what each takes.")
    elif isinstance(e, flags.UnrecognizedFlagError):
      message += "; see --help for the flags"
    raise UsageError(message) from None
  except Exception as e:  # pylint: disable=broad-except
    message = _config_file_error(e, argv)
    if message is None:
      raise
    raise UsageError(message) from None
  _check_config_files(flag_values)
  _check_config_keys(flag_values)
  quiet_logs()
  return rest


def _config_flags(flag_values: flags.FlagValues) -> Iterator[flags.Flag]:
  for name in list(flag_values):
    flag = flag_values[name]
    if flag.name == name and type(flag).__name__ == "_ConfigFlag":
      yield flag


def _resolve_config_files(argv: list[str], flag_values: flags.FlagValues) -> list[str]:
  """``argv`` with each config flag's value that is not a file but names a preset (``--config alexnet:fast``,
  ``--config alexnet_fast``, ``--config configs/alexnet_fast.py`` from any directory) replaced by the preset's
  ``FILE:VARIANT``; raises :class:`UsageError` listing the presets when it is neither."""
  names = {flag.name for flag in _config_flags(flag_values)}
  resolved, value_of = list(argv), None
  for i, arg in enumerate(argv[1:], 1):
    match = re.match(r"--(\w+)(?:=(.*))?$", arg, re.S)
    if value_of is not None:
      resolved[i], value_of = _config_file(arg, value_of), None
    elif match and match.group(1) in names:
      if match.group(2) is None:
        value_of = match.group(1)
      else:
        resolved[i] = f"--{match.group(1)}={_config_file(match.group(2), match.group(1))}"
  return resolved


def _config_file(value: str, flag: str) -> str:
  if os.path.isfile(value):
    return value
  try:
    return config_lib.resolve(value)  # ml_collections' FILE:ARGUMENT passes ARGUMENT to get_config
  except ValueError as e:
    raise UsageError(str(e).replace("--config ", f"--{flag} ", 1)) from None


def _check_config_keys(flag_values: flags.FlagValues) -> None:
  """A key set in a config file that its model's schema has not (a typo, another model's dictionary size, a flat
  key of earlier versions) is found at parse time, named with the fix."""
  for flag in _config_flags(flag_values):
    if isinstance(flag.value, ml_collections.ConfigDict):
      try:
        config_lib.check_keys(flag.value)
      except ValueError as e:
        raise UsageError(f"--{flag.name} {config_flags.get_config_filename(flag)}: {e}") from None


def _model_name(argv: Sequence[str]) -> str | None:
  """The model of the config file on the command line (whose keys the config has), or None."""
  for flag, value in zip(argv, [*argv[1:], ""]):  # --config FILE[:VARIANT] or --config=FILE[:VARIANT]
    match = re.match(r"--\w+(?:=(.*))?$", flag)
    file = (match.group(1) if match.group(1) is not None else value) if match else ""
    path = file.partition(":")[0]
    if path.endswith(".py") and os.path.isfile(path):
      try:
        return config_lib.load(file).model.name
      except Exception:  # pylint: disable=broad-except  # the message it serves names the key either way
        return None
  return None


def _config_file_error(e: Exception, argv: Sequence[str]) -> str | None:
  """The message for an exception raised while ml_collections loaded a config file or applied an override, or None
  when it came from elsewhere."""
  frames = {os.path.abspath(frame.filename) for frame in traceback.extract_tb(e.__traceback__)}
  key = re.search(r'instead of "(\w+)"', str(e)) or re.search(r"'(\w+)'", str(e))
  if isinstance(e, (AttributeError, KeyError)) and key and any(f.endswith("config_path.py") for f in frames):
    key = key.group(1)
    override = next((arg.split("=")[0] for arg in argv if re.match(rf"--\w+\.(\w+\.)*{key}(=|$)", arg)), key)
    path = override.partition(".")[2]
    model = _model_name(argv)
    if path.startswith("model.") and model in config_lib.model_names():
      message = config_lib.unknown_key(path, model)
      if not message.startswith("there is no config key"):
        new = config_lib.RENAMED.get(key)
        value = next((arg.partition("=")[2] for arg in argv if arg.startswith(override + "=")), "")
        if new and new.split(".")[-1] in config_lib.dictionary_keys(model) and value:
          flag = f"{override.partition('.')[0]}.model.{new}={value}"
          message += f": pass {shlex.quote(flag)}"
        renamed_to = next((arg.partition("=")[2] for arg in argv if re.match(r"--\w+\.model\.name=", arg)), model)
        if renamed_to != model:
          message += (f" (--config.model.name={renamed_to} keeps the file's keys: start from a config of "
                      f"{renamed_to})")
        return (f"{override}: {message}. The config's model {config_lib.takes(model)}; docs/config.md lists "
                "every model's keys and the presets.")
    suggestion = re.search(r'Did you mean "(\w+)"', str(e))
    hint = f"did you mean {suggestion.group(1)!r}? " if suggestion else ""
    return (f"{override}: there is no config key {key!r}; {hint}--print_config lists the keys of the config, "
            "docs/config.md explains them.")
  paths = {os.path.abspath(part) for arg in argv[1:] for part in re.split("[=:]", arg) if part}
  if isinstance(e, SyntaxError) and e.filename:
    frames.add(os.path.abspath(e.filename))
  in_config = sorted(paths & frames)
  if in_config:
    return (f"--config {in_config[0]} could not be loaded ({type(e).__name__}: {e}). A config file is a Python "
            "file whose get_config() returns an ml_collections.ConfigDict, such as configs/quickstart.py.")
  if isinstance(e, AttributeError) and "get_config" in str(e):
    return ("the --config file has no get_config(): a config file is a Python file whose get_config() returns an "
            "ml_collections.ConfigDict, such as configs/quickstart.py.")
  return None


def _check_config_files(flag_values: flags.FlagValues) -> None:
  """A config file that does not exist is found at parse time (ml_collections defers it to first use)."""
  for flag in _config_flags(flag_values):
    if type(flag.value).__name__ == "_ErrorConfig":
      path = config_flags.get_config_filename(flag)
      raise UsageError(f"--{flag.name} {path}: no such file. Pass a config file such as configs/quickstart.py "
                       "(a path relative to the current directory, or absolute) or a preset: "
                       f"{', '.join(config_lib.presets())}.")


class _OwnOrWarnings(std_logging.Filter):
  """Passes lcnn_jax's own log lines and every warning or error; drops other libraries' INFO and DEBUG lines."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or os.path.abspath(record.pathname).startswith(PACKAGE_DIR)


class _Plain(std_logging.Formatter):
  """``message`` for INFO, ``warning: message`` above: for a person, not for a log collector."""

  def format(self, record: std_logging.LogRecord) -> str:
    message = super().format(record)
    return message if record.levelno < std_logging.WARNING else f"{record.levelname.lower()}: {message}"


def quiet_logs() -> None:
  """Unless ``--verbosity`` was given: lcnn_jax's INFO lines and everyone's warnings, as plain lines on stderr."""
  if "verbosity" in flags.FLAGS and not flags.FLAGS["verbosity"].using_default_value:
    return
  logging.use_absl_handler()  # app.run installs it; a command parsing its own flags may not have
  if not flags.FLAGS.is_parsed():  # such a command leaves absl's flags at their defaults
    flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _OwnOrWarnings) for f in handler.filters):
    handler.addFilter(_OwnOrWarnings())
  handler.setFormatter(_Plain("%(message)s"))


def check_output_dir(path: str, flag: str) -> None:
  """Creates ``path`` if needed and checks a file can be written there; raises :class:`UsageError` if not."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise UsageError(f"{flag} {path} is a file, not a directory: pass a new or existing directory.")
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise UsageError(f"{flag} {path} cannot be written ({e.strerror}): pass a directory you can write to.") from None


def check_output_file(path: str, flag: str) -> None:
  """Raises :class:`UsageError` unless a file can be written at ``path`` (its directory exists and is writable)."""
  directory = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise UsageError(f"{flag} {path} is a directory: pass a file name.")
  if not os.path.isdir(directory):
    raise UsageError(f"{flag} {path}: the directory {directory} does not exist; create it or pass another path.")
  try:
    with tempfile.TemporaryFile(dir=directory):
      pass
  except OSError as e:
    raise UsageError(f"{flag} {path} cannot be written ({e.strerror}): pass a path in a directory you can write "
                     "to.") from None


@contextlib.contextmanager
def no_empty_dir_left(path: str) -> Iterator[None]:
  """Removes the directories of ``path`` this block created if it fails and leaves them empty (never a file)."""
  created, missing = [], os.path.abspath(path)
  while not os.path.exists(missing):
    created.append(missing)
    missing = os.path.dirname(missing)
  try:
    yield
  except BaseException:
    for directory in created:  # innermost first
      with contextlib.suppress(OSError):
        os.rmdir(directory)  # only ever succeeds on an empty directory
    raise


class StopSignals:
  """Within the block, SIGINT and SIGTERM only record that a stop was asked (``signum``), so the loop can save
  and stop at a step boundary; a second signal stops at once. Outside the main thread it does nothing."""

  def __init__(self):
    self.signum: int | None = None
    self.previous: dict[int, object] = {}

  def _record(self, signum, frame) -> None:
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # e.g. SIGINT of a job started with `&`
          self.previous[signum] = signal.signal(signum, self._record)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self.previous.items():
      signal.signal(signum, handler)
