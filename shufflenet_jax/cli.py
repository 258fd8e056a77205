"""The command line: `python launch.py COMMAND --config=configs/FILE.py:ARGS ...`, or the same
commands as `shufflenet-jax COMMAND ...` (the console script of `pip install .`) from any
directory, with config and experiment files given by path.

Commands:
  summary  per-layer table (output size, channels, MFLOPs, params); --json adds a JSON last line
  train    train_and_evaluate(config, workdir), resuming from the workdir if it holds a run
  eval     evaluate the latest checkpoint in --workdir and print top-1/top-5 (--ema: the EMA
           of its weights, for a run trained with --config.ema_decay > 0; predict and export too)
  recalibrate  BN statistics of the latest checkpoint recomputed over --steps training batches
           with the weights frozen, into a new workdir (--output, default WORKDIR/recalibrated)
  sweep    expand --experiment=experiments/FILE.py[:args] into runs under --root; print their
           commands (--dry_run), run them here (--local), or on a TPU VM (--tpu, --zone)
  report   the experiment's paper table with our results beside the paper's (Markdown, CSV, PNG)
  import   PyTorch weights -> a new --workdir: --from=torchvision|megvii_v1|megvii_v2
           --weights=FILE.pth
  predict  top-5 classes of image files: predict --workdir=W IMAGE...
  export   the model of --workdir as a deployable program: --format=stablehlo|tflite
  compile  compile the train and eval steps for a TPU topology on this machine (needs libtpu):
           memory per device vs HBM, FLOPs and bytes per step, estimated step time; run it
           before every pod launch (`sweep --plan --topology=...` does it for a whole sweep)

sweep and report pass `--config.KEY=VALUE` overrides through to every run. eval, recalibrate,
predict and export read the workdir's config.json when --config is not given.
"""

from __future__ import annotations

import difflib
import errno
import json
import multiprocessing.util
import os
import sys
import threading
import traceback
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from shufflenet_jax import config_files

COMMANDS = ("summary", "train", "eval", "recalibrate", "sweep", "report", "compile", "import",
            "predict", "export")
SWEEP_COMMANDS = ("sweep", "report")

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
flags.DEFINE_integer("initialization_timeout_seconds", 300,
                     "Multi-host: give up (one error line) if the cluster has not formed by then.")
flags.DEFINE_string("experiment", None, "sweep/report: experiments/FILE.py[:args].")
flags.DEFINE_string("root", None, "sweep/report: directory holding one workdir per run.")
flags.DEFINE_bool("dry_run", False, "sweep: print every run's command.")
flags.DEFINE_bool("local", False, "sweep: run every run here, one after another (resumable).")
flags.DEFINE_string("tpu", None, "sweep: TPU VM name; prints the gcloud line of every run.")
flags.DEFINE_string("zone", None, "sweep: the TPU VM's zone.")
flags.DEFINE_string("remote_dir", "shufflenet_jax", "sweep: the repository's path on the TPU VM.")
flags.DEFINE_bool("execute", False, "sweep --tpu: run the gcloud lines instead of printing them.")
flags.DEFINE_bool("plan", False, "sweep: estimated step time, wall time and chip-hours of "
                  "every run on --topology.")
flags.DEFINE_string("topology", None, "compile, sweep --plan: TPU slice, e.g. v5e:16x16, v4:4x4x4.")
flags.DEFINE_integer("num_slices", 1, "compile, sweep --plan: slices joined over DCN.")
flags.DEFINE_string("output", None, "report: output path without suffix (default ROOT/report); "
                    "export: the artifact's path (default WORKDIR/export/...); recalibrate: the "
                    "new workdir (default WORKDIR/recalibrated).")
flags.DEFINE_integer("steps", 100, "recalibrate: training batches the BN statistics average.")
flags.DEFINE_enum("from", "torchvision", ["torchvision", "megvii_v1", "megvii_v2"],
                  "import: where the weights come from (torchvision ShuffleNetV2, or the official "
                  "Megvii ShuffleNet-Series V1/V2 checkpoints).")
flags.DEFINE_string("weights", None, "import: the .pth state_dict file.")
flags.DEFINE_string("format", "stablehlo", "export: stablehlo | tflite (TensorFlow needed).")
flags.DEFINE_bool("ema", False, "eval, predict, export: the run's EMA weights (a run trained with "
                  "--config.ema_decay > 0) instead of its trained weights.")

# `--config.KEY=VALUE` given to sweep/report: passed through to every run's command line.
PASSTHROUGH: list[str] = []
# Commands whose every process joins the job's cluster (sweep --local passes the flags on).
CLUSTER_COMMANDS = ("train", "eval", "recalibrate")
CLUSTER_FLAGS = ("coordinator_address", "num_processes", "process_id",
                 "heartbeat_timeout_seconds", "initialization_timeout_seconds")


def _join_cluster() -> None:
  """jax.distributed from the flags, else auto-detected (TPU pod, SLURM, GKE), before any other
  JAX call; every process then logs which one it is."""
  from shufflenet_jax import parallel
  parallel.initialize_distributed(
      FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
      heartbeat_timeout_seconds=FLAGS.heartbeat_timeout_seconds,
      initialization_timeout_seconds=FLAGS.initialization_timeout_seconds)
  print(parallel.describe_processes(), flush=True)


def _cluster_args() -> list[str]:
  """The cluster flags given on this command line, for the runs `sweep --local` starts."""
  return [f"--{name}={FLAGS[name].value}" for name in CLUSTER_FLAGS if FLAGS[name].present]


def _summary(config) -> None:
  from shufflenet_jax import summary  # imported late: keeps `--help` fast
  result = summary.summarize(config)
  print(summary.format_table(result))
  if FLAGS.json:
    print(json.dumps({"model": result["model"], "macs": result["macs"],
                      "params": result["params"], "input_size": result["input_size"]}))


def _compile(config) -> None:
  from shufflenet_jax import pod_check
  if not FLAGS.topology:
    raise app.UsageError("compile needs --topology, e.g. --topology=v5e:4x4")
  result = pod_check.compile_check(config, FLAGS.topology, FLAGS.num_slices)
  print(pod_check.format_report(result))
  if FLAGS.json:
    print(json.dumps(result))
  pod_check.check_fits(result)


def _config_or_workdir_config():
  """--config, else the config.json of the run in --workdir (eval, predict, export)."""
  from shufflenet_jax import workdir as workdir_files
  return FLAGS.config or workdir_files.load_config(FLAGS.workdir)


def _interop(command: str, images: list[str]) -> None:
  if FLAGS.workdir is None:
    raise app.UsageError(f"{command} needs --workdir")
  if command == "import":
    from shufflenet_jax.interop import importing
    if not FLAGS.weights:
      raise app.UsageError("import needs --weights=FILE.pth")
    importing.import_weights(FLAGS["from"].value, FLAGS.weights, FLAGS.workdir, FLAGS.config)
    return
  config = _config_or_workdir_config()
  if command == "predict":
    from shufflenet_jax import predict
    predict.predict(config, FLAGS.workdir, images, ema=FLAGS.ema)
  else:
    from shufflenet_jax.interop import export
    export.export(config, FLAGS.workdir, FLAGS.format, FLAGS.output, ema=FLAGS.ema)


def _sweep_or_report(command: str) -> None:
  from shufflenet_jax import sweeps  # imported late: keeps `--help` fast
  if FLAGS.config is not None:
    raise app.UsageError(f"{command} takes --experiment, not --config (each run has its own)")
  if not FLAGS.experiment or not FLAGS.root:
    raise app.UsageError(f"{command} needs --experiment=experiments/FILE.py and --root=DIR")
  runs = sweeps.expand(FLAGS.experiment)
  sweeps.check_overrides(runs, PASSTHROUGH)
  if command == "report":
    from shufflenet_jax import report
    report.write_report(FLAGS.experiment, runs, FLAGS.root, FLAGS.output)
    return
  modes = [m for m in ("dry_run", "local", "tpu", "plan") if FLAGS[m].value]
  if len(modes) != 1:
    raise app.UsageError("sweep needs exactly one of --dry_run, --local, --tpu, --plan "
                         f"(got {modes})")
  if FLAGS.plan:
    from shufflenet_jax import pod_check
    if not FLAGS.topology:
      raise app.UsageError("--plan needs --topology, e.g. --topology=v5e:4x4")
    table, _ = pod_check.plan(runs, PASSTHROUGH, FLAGS.topology, FLAGS.num_slices)
    print(table)
    return
  if FLAGS.local:
    sys.exit(1 if sweeps.run_local(runs, FLAGS.root, PASSTHROUGH, _cluster_args()) else 0)
  if FLAGS.dry_run:
    print(f"# run these from {os.getcwd()}: their paths are relative to it")
    for run in runs:
      print(sweeps.train_command(run, FLAGS.root, PASSTHROUGH))
    return
  if not FLAGS.zone:
    raise app.UsageError("--tpu needs --zone")
  commands = [sweeps.tpu_command(run, FLAGS.root, PASSTHROUGH, tpu=FLAGS.tpu, zone=FLAGS.zone,
                                 remote_dir=FLAGS.remote_dir) for run in runs]
  if FLAGS.execute:
    sys.exit(sweeps.run_tpu(commands))
  print("\n".join(commands))


PATH_FLAGS = ("--config=", "--experiment=", "--workdir=", "--root=", "--output=", "--weights=",
              "--config.data_dir=", "--config.tfds_data_dir=")


def _expand_user(argv: list[str]) -> list[str]:
  """`--workdir=~/runs/a`: the shell leaves a `~` after `=` alone; expand it as a path."""
  expanded = []
  for arg in argv:
    prefix = next((p for p in PATH_FLAGS if arg.startswith(p)), None)
    if prefix is not None and arg[len(prefix):].startswith("~"):
      arg = prefix + os.path.expanduser(arg[len(prefix):])
    expanded.append(arg)
  return expanded


def _check_config_file(spec: str) -> None:
  """A missing or broken config file as one line (absl would print its traceback)."""
  path = spec.partition(":")[0]
  if not os.path.isfile(path):
    where = "" if os.path.isabs(path) else f" (relative to the current directory {os.getcwd()})"
    raise app.UsageError(f"--config file {path!r} does not exist{where}")
  try:
    compile(Path(path).read_text(), path, "exec")
  except SyntaxError as e:
    raise app.UsageError(f"--config file {path} line {e.lineno}: {e.msg}") from None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a bad --config reported as one line instead of a traceback."""
  argv = config_files.integer_words(_expand_user(argv))
  for spec in (a.removeprefix("--config=") for a in argv if a.startswith("--config=")):
    try:
      _check_config_file(spec)
    except app.UsageError as e:
      sys.stderr.write(f"error: {e}\n")
      sys.exit(2)
    config_files.add_project_root(spec.partition(":")[0])  # absl loads the file itself
  if any(a in SWEEP_COMMANDS for a in argv[1:]):
    PASSTHROUGH.extend(a for a in argv[1:] if a.startswith("--config."))
    argv = [a for a in argv if not a.startswith("--config.")]
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
    specs = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    valid = sorted(config_files.load_config(specs[-1]).keys()) if specs else []
    keys = [a.split("=")[0].removeprefix("--config.") for a in argv if a.startswith("--config.")]
    unknown = [k for k in keys if k.split(".")[0] not in valid] or keys
    hints = [m for k in unknown for m in difflib.get_close_matches(k.split(".")[0], valid, 1)]
    hint = f"; did you mean {hints}?" if hints else ""
    sys.stderr.write(f"error: unknown config key {unknown}{hint} valid keys: {valid}\n")
    sys.exit(2)


def main(argv: list[str]) -> None:
  if not FLAGS["verbosity"].present:  # absl defaults to INFO: Orbax would flood the console
    logging.set_verbosity(logging.WARNING)
  if len(argv) < 2 or argv[1] not in COMMANDS or (len(argv) > 2 and argv[1] != "predict"):
    raise app.UsageError(f"expected one command from {COMMANDS}, got {argv[1:]}")
  command = argv[1]
  if command in CLUSTER_COMMANDS:
    _join_cluster()
  if command in ("import", "predict", "export"):
    _interop(command, argv[2:])
    return
  if command in SWEEP_COMMANDS:
    _sweep_or_report(command)
    return
  if command == "eval" and FLAGS.config is None and FLAGS.workdir:
    from shufflenet_jax import train
    train.evaluate_checkpoint(_config_or_workdir_config(), FLAGS.workdir, ema=FLAGS.ema)
    return
  if command == "recalibrate":
    from shufflenet_jax import recalibration
    if FLAGS.workdir is None:
      raise app.UsageError("recalibrate needs --workdir")
    recalibration.recalibrate(_config_or_workdir_config(), FLAGS.workdir, FLAGS.steps,
                              FLAGS.output)
    return
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/default.py")
  if command == "summary":
    _summary(FLAGS.config)
    return
  if command == "compile":
    _compile(FLAGS.config)
    return
  if FLAGS.workdir is None:
    raise app.UsageError(f"{command} needs --workdir")
  from shufflenet_jax import train
  if command == "train":
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  else:
    train.evaluate_checkpoint(FLAGS.config, FLAGS.workdir, ema=FLAGS.ema)


def _storage_error_line(error: OSError) -> str:
  """'no space left on the device (ENOSPC) at PATH; kept: ...' for a failed write."""
  from shufflenet_jax import workdir as workdir_files
  line = f"{workdir_files.STORAGE_ERRORS[error.errno]} ({errno.errorcode[error.errno]})"
  if error.filename:
    line += f" writing {error.filename}"
  if FLAGS.workdir is not None and os.path.isdir(FLAGS.workdir):
    line += f"; kept: {workdir_files.what_was_kept(FLAGS.workdir)}"
  if error.errno in (errno.ENOSPC, errno.EDQUOT):
    return line + "; free some space and rerun the same command (a run resumes from its checkpoint)"
  return line + "; use a writable --workdir (or fix its permissions) and rerun the same command"


def _quiet_background_errors() -> None:
  """Orbax's save threads log and re-raise a failed write in the main thread, where it ends in
  one line; their own logs and thread tracebacks are noise on the console (-v shows them)."""
  handler = logging.get_absl_handler()
  handler.addFilter(lambda record: "/orbax/" not in record.pathname.replace("\\", "/"))
  threading.excepthook = lambda args: None
  default_unraisable = sys.unraisablehook

  def unraisable(report) -> None:
    # After a failed save Orbax closes its event loop while TensorStore's other writes are still
    # failing; each one's completion callback then reports "Event loop is closed" from C++.
    if not (isinstance(report.exc_value, RuntimeError)
            and str(report.exc_value) == "Event loop is closed"):
      default_unraisable(report)

  sys.unraisablehook = unraisable


def _main_with_clear_errors(argv: list[str]) -> None:
  """Expected failures (bad values, missing data, busy workdir, NaN, a full or read-only disk,
  Ctrl-C) end in one line: exit 1 (130 for Ctrl-C); others in their traceback, exit 1."""
  from shufflenet_jax import workdir as workdir_files
  from shufflenet_jax.parallel import ClusterError
  from shufflenet_jax.train import NonFiniteLossError
  verbose = FLAGS["verbosity"].present  # -v: full tracebacks and library logs, for debugging
  if not verbose:
    _quiet_background_errors()
  try:
    main(argv)
  except app.UsageError:
    raise  # absl prints it with the usage line
  except KeyboardInterrupt:
    if verbose:
      traceback.print_exc()
    sys.stderr.write("\nerror: interrupted (Ctrl-C) before a checkpoint could be saved; what "
                     "the workdir held is unchanged\n")
    _exit_now(130)
  except Exception as e:  # noqa: BLE001 - sorted into one-line errors below, else traceback
    storage = workdir_files.storage_error(e)
    if verbose or (storage is None and not isinstance(
        e, (ValueError, FileNotFoundError, FileExistsError, NonFiniteLossError,
            workdir_files.WorkdirInUseError, ClusterError))):
      traceback.print_exc()
      _exit_now(1)
    if storage is None:
      sys.stderr.write(f"error: {e}\n")
    else:
      # Orbax's writer tasks go on failing one by one against the same disk while the
      # interpreter shuts down (each logs its own traceback): one more reason to stop at once.
      sys.stderr.write(f"error: {_storage_error_line(storage)}\n")
    _exit_now(1)


def _exit_now(code: int) -> None:
  """Exits without waiting for background threads. Everything the run keeps is closed by the
  time an error gets here (checkpoints, metrics, the workdir lock), but a failed async save
  leaves Orbax's signalling thread waiting for a signal that never comes, and grain's prefetch
  threads may still be blocked: a normal exit would join them and hang forever."""
  sys.stdout.flush()
  sys.stderr.flush()
  logging.flush()
  try:  # what atexit would do for grain's worker processes: stop them, unlink their semaphores
    multiprocessing.util._exit_function()  # noqa: SLF001
  finally:
    os._exit(code)


def run() -> None:
  """Entry point of launch.py, `python -m shufflenet_jax` and the `shufflenet-jax` script."""
  app.run(_main_with_clear_errors, flags_parser=_parse_flags)
