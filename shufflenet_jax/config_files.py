"""Config files: big_vision-style typed `key=value` args and loading `path/to/file.py[:args]`.

Config and experiment files are Python files given by path (`--config=configs/default.py:...`),
from any directory: a file's project root (the nearest folder above it that holds a `configs`
package) is importable while it loads, so `from configs import common` works in installed use
too. The package itself never imports the repository's `configs/` or `experiments/`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import ml_collections

AUTO_WORKERS = -1  # num_workers=auto: grain workers from the host's cores (data/pipeline.py)
# Words a `--config.KEY=WORD` flag may give for an integer key, and the number stored.
INTEGER_WORDS = {"num_workers": {"auto": AUTO_WORKERS}}


def integer_words(argv: list[str]) -> list[str]:
  """`--config.num_workers=auto` -> `--config.num_workers=-1` (the key holds an integer)."""
  out = []
  for arg in argv:
    key, _, value = arg.removeprefix("--config.").partition("=")
    if arg.startswith("--config.") and value in INTEGER_WORDS.get(key, {}):
      arg = f"--config.{key}={INTEGER_WORDS[key][value]}"
    out.append(arg)
  return out


_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


def convert(key: str, raw: str, default):
  """Parses `raw` to the type of `default`; the error names the key, the value and the type."""
  try:
    if isinstance(default, bool):
      if raw.lower() in _TRUE + _FALSE:
        return raw.lower() in _TRUE
      raise ValueError
    if isinstance(default, int):
      return int(raw)
    if isinstance(default, float):
      return float(raw)
  except ValueError:
    expected = f"one of {_TRUE + _FALSE}" if isinstance(default, bool) else type(default).__name__
    raise ValueError(f"config arg {key}={raw!r} is not a valid {expected}") from None
  return raw


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """big_vision-style `key=value,key=value` config args, typed by their defaults.

  A bare `key` means `key=true`. Unknown keys are an error that lists the valid ones.
  """
  values = dict(defaults)
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, _, raw = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; valid args: {sorted(defaults)}")
    values[key] = convert(key, raw if "=" in item else "true", defaults[key])
  return ml_collections.ConfigDict(values)


def check_choice(name: str, value, choices) -> None:
  if value not in choices:
    raise ValueError(f"config arg {name}={value!r} is not one of {tuple(choices)}")


def split_arg(arg: str | None, key: str, default: str) -> tuple[str, str]:
  """(value of `key`, the other items) of a `key=value,...` arg: for configs that dispatch."""
  value, rest = default, []
  for item in (arg or "").split(","):
    name, _, raw = item.strip().partition("=")
    if name == key:
      value = raw
    elif item.strip():
      rest.append(item.strip())
  return value, ",".join(rest)


def project_root(path: str | Path) -> Path | None:
  """The nearest folder above `path` that holds a `configs` package (the repository), if any."""
  for folder in Path(path).resolve().parents:
    if (folder / "configs" / "__init__.py").is_file():
      return folder
  return None


def add_project_root(path: str | Path) -> None:
  """Makes the file's project importable (`from configs import common`), after everything else
  on sys.path so that it never shadows an installed module."""
  root = project_root(path)
  if root is not None and str(root) not in sys.path:
    sys.path.append(str(root))


def load_module(path: str, kind: str = "config", hint: str = ""):
  """Executes the Python file at `path` (a config or experiment file) and returns its module."""
  if not Path(path).is_file():
    raise FileNotFoundError(f"{kind} file {path!r} does not exist{hint}")
  add_project_root(path)
  module_spec = importlib.util.spec_from_file_location(f"_{kind}_{Path(path).stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:args]` the way `--config=` does, for tests, sweeps and tools."""
  path, _, arg = spec.partition(":")
  return load_module(path).get_config(arg or None)
