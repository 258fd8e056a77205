"""A run's directory and its small files: the lock, config.json, result.json and metrics.jsonl.

Every file the project reads names itself (and the line, for JSONL) when it cannot be read, and
every write that readers may see half-done is atomic (a temporary file renamed over the old one).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import time
from pathlib import Path

import ml_collections

from shufflenet_jax import parallel

CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
# Keys that may differ between a workdir's config.json and a resumed run's config.
RESUMABLE_CHANGES = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                     "keep_checkpoints", "num_workers", "data_dir", "tfds_data_dir", "resume",
                     "conv_impl", "total_steps", "num_epochs", "eval_batch_size",
                     "profile_steps")


class WorkdirInUseError(RuntimeError):
  """Another live run holds the workdir."""


class UnreadableFileError(ValueError):
  """A file of a workdir (or an experiment's root) exists but cannot be parsed."""


@contextlib.contextmanager
def lock(workdir: Path):
  """Holds an exclusive flock on workdir/.lock for the run (the chief process only).

  The kernel drops the lock when the holder dies, even by SIGKILL, so a crash never leaves the
  workdir locked. (flock is advisory and per host: a shared-filesystem workdir is locked by the
  chief host only.)
  """
  if not parallel.is_chief():
    yield
    return
  workdir.mkdir(parents=True, exist_ok=True)
  with open(workdir / ".lock", "a+") as handle:
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "unknown"
      raise WorkdirInUseError(f"{workdir} is in use by a live run (pid {holder}); wait for it, "
                              "stop it, or use another --workdir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def write_atomically(path: Path, text: str) -> None:
  """Readers (other processes, sweeps, reports) see the old file or the new one, never half."""
  temporary = path.with_name(f".{path.name}.{os.getpid()}")
  try:
    temporary.write_text(text)
    os.replace(temporary, path)
  finally:
    temporary.unlink(missing_ok=True)


def read_json(path: Path):
  """The parsed file; UnreadableFileError naming it if it is not valid JSON."""
  text = Path(path).read_text()
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise UnreadableFileError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}; "
                              f"{len(text)} bytes)") from None


# config.json


# Keys added after runs were already saved, with the value an older config.json meant by leaving
# them out: such a run still resumes.
ADDED_KEYS = {"ema_decay": 0.0}


def _config_differences(saved: dict, current: dict) -> list[str]:
  saved = {**ADDED_KEYS, **saved}
  keys = sorted((set(saved) | set(current)) - set(RESUMABLE_CHANGES))
  return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys
          if saved.get(k) != current.get(k)]


def config_values(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def check_resumable(config, workdir: Path, has_checkpoints: bool, steps=()) -> None:
  """Refuses (before anything is written) a workdir that holds a different run."""
  path = workdir / CONFIG_FILE
  if has_checkpoints and config.resume == "never":
    raise FileExistsError(f"{workdir} already holds checkpoints {list(steps)} and "
                          "resume='never'; use a new --workdir (nothing was overwritten)")
  if has_checkpoints and path.exists() and config.resume != "force":
    differences = _config_differences(read_json(path), config_values(config))
    if differences:
      raise ValueError(f"{workdir} holds a run with a different config ({'; '.join(differences)})"
                       "; use a new --workdir, or --config.resume=force to resume anyway")


def write_config(config, workdir: Path) -> None:
  """workdir/config.json (the chief only); an earlier, different one is kept beside it."""
  if not parallel.is_chief():
    return
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / CONFIG_FILE
  text = json.dumps(config_values(config), indent=2, sort_keys=True) + "\n"
  if path.exists() and path.read_text() == text:
    return  # other processes may be reading it: never rewrite an identical file
  if path.exists():  # resume=force or resumable changes: keep the earlier one
    path.rename(workdir / f"config.{int(time.time())}.json")
  write_atomically(path, text)


def load_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The config a workdir's run was trained (or imported) with, from its config.json."""
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: pass --config, or a --workdir that holds a "
                            "run (train or import first)")
  values = read_json(path)
  if not isinstance(values, dict) or "model" not in values:
    raise UnreadableFileError(f"{path} is not a run's config (no 'model' key)")
  values["crop_area"] = tuple(values.get("crop_area", (0.08, 1.0)))
  return ml_collections.ConfigDict(values)


# result.json


def write_result(workdir: Path, step: int, eval_results: dict) -> None:
  """workdir/result.json marks a finished run (sweeps skip it, reports read it); atomic."""
  text = json.dumps({"step": int(step), **{k: float(v) for k, v in eval_results.items()}},
                    indent=2, sort_keys=True) + "\n"
  write_atomically(Path(workdir) / RESULT_FILE, text)


def read_result(workdir: str | Path) -> dict | None:
  """The finished run's final step and eval metrics, or None while it is unfinished."""
  path = Path(workdir) / RESULT_FILE
  if not path.exists():
    return None
  result = read_json(path)
  if not isinstance(result, dict) or not {"step", "eval/top1"} <= set(result):
    raise UnreadableFileError(f"{path} is not a run's result (needs 'step' and 'eval/top1')")
  return result


# metrics.jsonl


def read_metrics(workdir: str | Path) -> list[dict]:
  """Every complete line of workdir/metrics.jsonl. A last line without its newline is a write
  still in progress (or cut by a crash) and is not returned; any other bad line raises
  UnreadableFileError naming the file and the line."""
  path = Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  lines = path.read_text().split("\n")[:-1]  # the part after the last newline is unfinished
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise UnreadableFileError(f"{path} line {number} is not valid JSON ({e.msg}): "
                                f"{line[:80]!r}") from None
  return records


def repair_metrics(workdir: Path) -> Path | None:
  """Before a resumed run appends: a partial last line (a crash mid-write) is moved to
  metrics.jsonl.partial.TIME and cut off, so the next line starts on a line of its own."""
  path = workdir / METRICS_FILE
  if not path.is_file():  # missing, or not a regular file (nothing to mend)
    return None
  data = path.read_bytes()
  if not data or data.endswith(b"\n"):
    return None
  keep = data.rfind(b"\n") + 1
  aside = workdir / f"{METRICS_FILE}.partial.{int(time.time())}"
  aside.write_bytes(data[keep:])
  with open(path, "r+b") as f:
    f.truncate(keep)
  return aside


# Storage errors


STORAGE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                  errno.EPERM: "operation not permitted"}


def storage_error(exception: BaseException) -> OSError | None:
  """The OSError behind `exception` (itself, or in its cause/context chain, as Orbax's threads
  wrap it) if it is one of STORAGE_ERRORS, else None."""
  seen = set()
  while exception is not None and id(exception) not in seen:
    seen.add(id(exception))
    if isinstance(exception, OSError) and exception.errno in STORAGE_ERRORS:
      if exception.filename is None:  # a write() on an open file: its path is in the traceback
        return OSError(exception.errno, exception.strerror, _path_written(exception))
      return exception
    text = str(exception)
    for code, words in STORAGE_ERRORS.items():  # TensorStore reports errno in its message
      if os.strerror(code) in text or words in text.lower():
        path = re.search(r'"(/[^"]+)"', text)  # the file it was writing
        return OSError(code, os.strerror(code), path.group(1) if path else None)
    exception = exception.__cause__ or exception.__context__
  return None


def _path_written(exception: BaseException) -> str | None:
  """The path of the innermost frame that holds one (`self` of a Path's write_text, a `path`
  argument), e.g. for Orbax's metadata writes, whose OSError names no file."""
  frames = []
  tb = exception.__traceback__
  while tb is not None:
    frames.append(tb.tb_frame)
    tb = tb.tb_next
  for frame in reversed(frames):
    for name in ("self", "path", "filename", "file"):
      value = frame.f_locals.get(name)
      if isinstance(value, os.PathLike):
        return os.fspath(value)
  return None


def what_was_kept(workdir: Path) -> str:
  """'checkpoint 40 (steps [20, 40])' of a workdir, in words, for error messages."""
  directory = Path(workdir) / "checkpoints"
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if (
      directory.is_dir()) else []
  if not steps:
    return f"no checkpoint in {directory}"
  return f"checkpoints {steps} in {directory} (the newest complete one is step {steps[-1]})"
