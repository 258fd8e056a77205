"""Experiment sweeps: expand `experiments/*.py` into named runs, print or run their commands.

An experiment file is a config file (`get_config(arg)` with typed `key=value` args) plus
`sweep(add)`, which calls `add(row=..., col=..., paper=..., family=..., **run_args)` once per run.
`run_args` become the run's config args, so every run is an ordinary training command:

  python launch.py train --config=experiments/table3_shuffle.py:groups=3,scale=1.0,shuffle=false \\
      --workdir=ROOT/groups-3_scale-1.0_shuffle-false

Args after the experiment's `:` (e.g. `experiments/table3_shuffle.py:proxy`) are appended to every
run's args; `--config.KEY=VALUE` overrides pass through to every run's command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from shufflenet_jax import config_files
from shufflenet_jax import workdir as workdir_files


@dataclasses.dataclass(frozen=True)
class Run:
  name: str            # the workdir's name under the sweep root, from the run args
  config: str          # config spec: experiments/FILE.py:run_args[,experiment_args]
  row: str             # the paper table's row and column labels of this run's cell
  col: str
  family: str          # model family (one line on the report's plot)
  paper: float | None  # the paper's top-1 error % for this cell (None where it has none)
  args: tuple[tuple[str, object], ...]


def load_experiment(path: str):
  """The experiment module at `path`; errors name the file and what it lacks."""
  module = config_files.load_module(path, "experiment", " (see experiments/)")
  for name in ("get_config", "sweep"):
    if not callable(getattr(module, name, None)):
      raise ValueError(f"experiment {path} has no {name}() function")
  return module


def _format(value) -> str:
  return str(value).lower() if isinstance(value, bool) else str(value)


def run_name(args: dict) -> str:
  """Deterministic workdir name from the run args, in the order the sweep gave them."""
  return "_".join(f"{key}-{_format(value)}" for key, value in args.items()) or "base"


def expand(experiment: str) -> list[Run]:
  """The runs of `experiments/FILE.py[:args]`, in the sweep's order; names must be unique."""
  path, _, experiment_args = experiment.partition(":")
  module = load_experiment(path)
  runs: list[Run] = []

  def add(*, row: str, col: str, family: str, paper: float | None = None, **args):
    arg = ",".join(f"{k}={_format(v)}" for k, v in args.items())
    arg = ",".join(a for a in (arg, experiment_args) if a)
    runs.append(Run(name=run_name(args), config=f"{path}:{arg}" if arg else path, row=row,
                    col=col, family=family, paper=paper, args=tuple(args.items())))

  module.sweep(add)
  names = [r.name for r in runs]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"experiment {path} adds runs with the same args twice: {duplicates}")
  return runs


def workdir(root: str, run: Run) -> str:
  return str(Path(root) / run.name)


def train_args(run: Run, root: str, overrides: list[str]) -> list[str]:
  """The command-line arguments that train `run` (and resume it, if its workdir holds a
  checkpoint)."""
  return ["train", f"--config={run.config}", f"--workdir={workdir(root, run)}", *overrides]


def train_command(run: Run, root: str, overrides: list[str], python: str = "python") -> str:
  return shlex.join([python, "launch.py", *train_args(run, root, overrides)])


def tpu_command(run: Run, root: str, overrides: list[str], *, tpu: str, zone: str,
                remote_dir: str = "shufflenet_jax") -> str:
  """The gcloud line that starts the run on every host of TPU VM `tpu` (jax.distributed joins
  them; the root must be a filesystem every host sees)."""
  remote = f"cd {shlex.quote(remote_dir)} && {train_command(run, root, overrides)}"
  gcloud = shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}",
                       "--worker=all"])
  return f"{gcloud} --command={shlex.quote(remote)}"


def _child_environment() -> dict[str, str]:
  """This process's environment, with this package importable from any working directory:
  `python -m shufflenet_jax` in a run's process is the same code as the sweep's."""
  package_parent = str(Path(__file__).resolve().parents[1])
  paths = [package_parent, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
  return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def run_local(runs: list[Run], root: str, overrides: list[str],
              cluster_args: list[str] = ()) -> int:
  """Trains the runs one after another here: finished ones (result.json) are skipped, interrupted
  ones resume from their checkpoint. A SIGTERM/Ctrl-C lets the current run save, then stops the
  sweep; rerunning the same command continues it. Returns the number of failed runs.
  `cluster_args` (launch.py's multi-host flags of this host) go to every run: each host of a
  cluster runs the same sweep, and each run is one multi-host job."""
  stop = {"signal": None}

  def handle(signum, frame):  # the child got the same signal (one process group) and saves
    stop["signal"] = signum

  previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
  failed = []
  try:
    for index, run in enumerate(runs, 1):
      header = f"[{index}/{len(runs)}] {run.name}"
      try:
        result = workdir_files.read_result(workdir(root, run))
      except workdir_files.UnreadableFileError as e:  # train rewrites it from the checkpoint
        print(f"{header}: WARNING: {e}; running it again", flush=True)
        result = None
      if result is not None:
        print(f"{header}: finished (step {result['step']}, top-1 {result['eval/top1']:.4f}), "
              "skipped", flush=True)
        continue
      command = [sys.executable, "-m", "shufflenet_jax",
                 *train_args(run, root, overrides), *cluster_args]
      print(f"{header}: {shlex.join(command)}", flush=True)
      code = subprocess.call(command, env=_child_environment())
      if stop["signal"] is not None:
        print(f"sweep interrupted during {run.name}; rerun the same command to resume",
              flush=True)
        return len(failed) + 1
      if code != 0:
        print(f"{header}: failed with exit code {code}; continuing with the next run",
              flush=True)
        failed.append(run.name)
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
  done = len(runs) - len(failed)
  print(f"sweep: {done}/{len(runs)} runs finished" +
        (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
  return len(failed)


def run_tpu(commands: list[str]) -> int:
  """Runs the gcloud lines one after another (each returns when its run ends on every host)."""
  for index, command in enumerate(commands, 1):
    print(f"[{index}/{len(commands)}] {command}", flush=True)
    code = subprocess.call(command, shell=True)
    if code != 0:
      print(f"gcloud exited with {code}; stopping (rerun to resume)", flush=True)
      return code
  return 0


def check_overrides(runs: list[Run], overrides: list[str]) -> None:
  """Every `--config.KEY=VALUE` names a key of every run's config (before any run starts)."""
  for run in runs:
    config = config_files.load_config(run.config)
    for override in overrides:
      path = override.removeprefix("--config.").split("=", 1)[0]
      node = config
      for part in path.split("."):
        if not hasattr(node, "keys") or part not in node.keys():
          valid = sorted(node.keys()) if hasattr(node, "keys") else []
          hint = difflib.get_close_matches(part, valid, 1)
          raise ValueError(f"{override}: {run.config} has no config key {path!r}"
                           + (f" (did you mean {hint[0]!r}?)" if hint else "")
                           + f"; valid keys: {valid}")
        node = node[part]


def apply_overrides(config, overrides: list[str]):
  """`--config.KEY=VALUE` strings applied to a loaded config, typed by the value they replace."""
  for override in overrides:
    path, _, raw = override.removeprefix("--config.").partition("=")
    *parents, leaf = path.split(".")
    node = config
    for part in parents:
      node = node[part]
    current = node[leaf]
    if isinstance(current, tuple | list):
      raise ValueError(f"{override}: tuple values cannot be overridden here; edit the config")
    node[leaf] = config_files.convert(path, raw, current)
  return config
