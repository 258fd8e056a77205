"""Command-line entry point: `python launch.py COMMAND --config=configs/FILE.py:ARGS ...`.

Commands:
  summary  per-layer table (output size, channels, MFLOPs, params); --json adds a JSON last line
  train    train_and_evaluate(config, workdir), resuming from the workdir if it holds a run
  eval     evaluate the latest checkpoint in --workdir and print top-1/top-5
"""

from __future__ import annotations

import difflib
import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

COMMANDS = ("summary", "train", "eval")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/default.py:groups=3",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics.jsonl, config.json.")
flags.DEFINE_bool("json", False, "summary: also print one JSON object on the last line.")
flags.DEFINE_string("coordinator_address", None,
                    "Multi-host without auto-detection: host:port of process 0's coordinator.")
flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes in the job.")
flags.DEFINE_integer("process_id", None, "Multi-host: this process's id in [0, num_processes).")
flags.DEFINE_integer("heartbeat_timeout_seconds", 100,
                     "Multi-host: a process silent this long is declared dead; the others abort.")


def _summary(config) -> None:
  from shufflenet_jax import summary  # imported late: keeps `--help` fast
  result = summary.summarize(config)
  print(summary.format_table(result))
  if FLAGS.json:
    print(json.dumps({"model": result["model"], "macs": result["macs"],
                      "params": result["params"], "input_size": result["input_size"]}))


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a bad --config reported as one line instead of a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    detail = str(e.__context__ or e).strip().splitlines()
    reason = detail[-1] if detail else str(e)
    for prefix in ("ValueError: ", "AttributeError: ", "KeyError: ", "TypeError: "):
      reason = reason.removeprefix(prefix)
    sys.stderr.write(f"error: bad flag value: {reason}\n"
                     "(python launch.py --help lists the flags)\n")
    sys.exit(2)
  except (AttributeError, KeyError):  # ml_collections: --config.<unknown key>=...
    from configs import common
    specs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    valid = sorted(common.load_config(specs[-1]).keys()) if specs else []
    keys = [a.split("=")[0].removeprefix("--config.") for a in argv if a.startswith("--config.")]
    unknown = [k for k in keys if k.split(".")[0] not in valid] or keys
    hints = [m for k in unknown for m in difflib.get_close_matches(k.split(".")[0], valid, 1)]
    hint = f"; did you mean {hints}?" if hints else ""
    sys.stderr.write(f"error: unknown config key {unknown}{hint} valid keys: {valid}\n")
    sys.exit(2)


def main(argv: list[str]) -> None:
  if not FLAGS["verbosity"].present:  # absl defaults to INFO: Orbax would flood the console
    logging.set_verbosity(logging.WARNING)
  if len(argv) != 2 or argv[1] not in COMMANDS:
    raise app.UsageError(f"expected one command from {COMMANDS}, got {argv[1:]}")
  command = argv[1]
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/default.py")
  if command == "summary":
    _summary(FLAGS.config)
    return
  if FLAGS.workdir is None:
    raise app.UsageError(f"{command} needs --workdir")
  from shufflenet_jax import train
  if command == "train":
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir)


def _main_with_clear_errors(argv: list[str]) -> None:
  """Expected failures (bad values, missing data, busy workdir, NaN) end in one line, exit 1."""
  from shufflenet_jax.train import NonFiniteLossError, WorkdirInUseError
  try:
    main(argv)
  except (ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError,
          WorkdirInUseError) as e:
    if FLAGS["verbosity"].present:  # -v: the full traceback for debugging
      raise
    sys.stderr.write(f"error: {e}\n")
    sys.exit(1)


if __name__ == "__main__":
  app.run(_main_with_clear_errors, flags_parser=_parse_flags)
