"""The paper's table with our results beside it: Markdown, CSV and a PNG of error vs MFLOPs.

Every cell comes from a run directory: finished runs (result.json) give their final top-1 error;
unfinished ones show their last step, missing ones show "missing". Nothing is filled in otherwise.
Complexity is counted from each run's model at ImageNet size (224x224x3, 1000 classes) even for a
proxy run, so the x axis is the paper's.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
from pathlib import Path

from shufflenet_jax import complexity, config_files, summary
from shufflenet_jax import workdir as workdir_files
from shufflenet_jax.sweeps import Run, load_experiment, workdir


@dataclasses.dataclass
class Cell:
  run: Run
  mflops: float          # counted at ImageNet size
  params_m: float
  status: str            # finished | unfinished | missing | unreadable (a file of the run)
  step: int | None
  error: float | None    # our top-1 error %, finished runs only
  dataset: str


def _imagenet_config(run: Run):
  """The run's config without proxy/smoke: the model the paper's complexity refers to."""
  return config_files.load_config(f"{run.config},proxy=false,smoke=false")


def collect(runs: list[Run], root: str) -> list[Cell]:
  cells = []
  for run in runs:
    imagenet = _imagenet_config(run)
    model = summary.abstract_model(imagenet)
    macs = complexity.model_macs(model, imagenet.input_size, imagenet.in_channels)
    params = complexity.count_params(model)
    directory = workdir(root, run)
    dataset = config_files.load_config(run.config).dataset
    try:
      result = workdir_files.read_result(directory)
      records = [] if result is not None else workdir_files.read_metrics(directory)
    except workdir_files.UnreadableFileError as e:  # shown as such; the report goes on
      print(f"WARNING: {run.name}: {e}", flush=True)
      cells.append(Cell(run, macs / 1e6, params / 1e6, "unreadable", None, None, dataset))
      continue
    if result is not None:
      status, step, error = "finished", result["step"], 100 * (1 - result["eval/top1"])
    else:
      status = "unfinished" if records else "missing"
      step, error = (records[-1]["step"] if records else None), None
    cells.append(Cell(run, macs / 1e6, params / 1e6, status, step, error, dataset))
  return cells


def _cell_text(cell: Cell) -> str:
  ours = {"finished": f"{cell.error:.1f}" if cell.error is not None else "",
          "unfinished": f"unfinished (step {cell.step})", "missing": "missing",
          "unreadable": "unreadable"}[cell.status]
  paper = f"{cell.run.paper:.1f}" if cell.run.paper is not None else "n/a"
  return f"{ours} / {paper}"


def _unique(values):
  return list(dict.fromkeys(values))


def markdown(title: str, experiment: str, cells: list[Cell], root: str) -> str:
  datasets = sorted({c.dataset for c in cells})
  rows = _unique(c.run.row for c in cells)
  cols = _unique(c.run.col for c in cells)
  grid = {(c.run.row, c.run.col): c for c in cells}
  proxy = datasets != ["imagenet2012"]
  out = io.StringIO()
  out.write(f"## {title}\n\n")
  if proxy:
    out.write(f"**CPU proxy on {', '.join(datasets)}: our errors are on that dataset, the "
              "paper's on ImageNet; compare the ordering within a column group, not the "
              "numbers.**\n\n")
  out.write(f"Experiment `{experiment}`, runs under `{root}`, generated "
            f"{datetime.date.today().isoformat()} by `python launch.py report "
            f"--experiment={experiment} --root={root}`.\n")
  out.write(f"Cells: our top-1 error % ({', '.join(datasets)}) / the paper's (ImageNet); "
            "n/a: the paper has no number for this cell.\n\n")
  out.write("| | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n")
  for row in rows:
    texts = [_cell_text(grid[row, col]) if (row, col) in grid else "" for col in cols]
    out.write(f"| {row} | " + " | ".join(texts) + " |\n")
  out.write("\n| run | MFLOPs (counted, 224x224) | params (M) | status | step | "
            "top-1 err % (ours) | top-1 err % (paper) |\n|---|---|---|---|---|---|---|\n")
  for c in cells:
    ours = f"{c.error:.2f}" if c.error is not None else "-"
    paper = f"{c.run.paper:.1f}" if c.run.paper is not None else "n/a"
    out.write(f"| {c.run.name} | {c.mflops:.1f} | {c.params_m:.2f} | {c.status} | "
              f"{c.step if c.step is not None else '-'} | {ours} | {paper} |\n")
  return out.getvalue()


CSV_FIELDS = ("run", "row", "col", "family", "config", "dataset", "mflops", "params_m", "status",
              "step", "top1_error", "paper_top1_error")


def csv_text(cells: list[Cell]) -> str:
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(CSV_FIELDS)
  for c in cells:
    writer.writerow([c.run.name, c.run.row, c.run.col, c.run.family, c.run.config, c.dataset,
                     f"{c.mflops:.2f}", f"{c.params_m:.4f}", c.status,
                     "" if c.step is None else c.step,
                     "" if c.error is None else f"{c.error:.3f}",
                     "" if c.run.paper is None else c.run.paper])
  return out.getvalue()


def plot(title: str, cells: list[Cell], path: Path) -> None:
  """Top-1 error vs counted MFLOPs per model family: the paper's numbers and ours side by side
  (two panels: a proxy's errors are on another dataset and scale)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  figure, (paper_axis, ours_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
  for family in _unique(c.run.family for c in cells):
    members = sorted((c for c in cells if c.run.family == family), key=lambda c: c.mflops)
    paper = [(c.mflops, c.run.paper) for c in members if c.run.paper is not None]
    ours = [(c.mflops, c.error) for c in members if c.error is not None]
    for axis, points in ((paper_axis, paper), (ours_axis, ours)):
      if points:
        axis.plot(*zip(*points), marker="o", label=family)
  datasets = ", ".join(sorted({c.dataset for c in cells}))
  paper_axis.set_title("paper (ImageNet)")
  ours_axis.set_title(f"ours ({datasets}; finished runs)")
  for axis in (paper_axis, ours_axis):
    axis.set_xscale("log")
    axis.set_xlabel("MFLOPs (counted at 224x224)")
    axis.set_ylabel("top-1 error %")
    axis.grid(True, alpha=0.3)
    if axis.lines:
      axis.legend(fontsize=7)
  figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)


def write_report(experiment: str, runs: list[Run], root: str, output: str | None = None) -> dict:
  """Writes OUTPUT.md, .csv and .png (default ROOT/report.*), prints the Markdown; returns paths."""
  path = experiment.partition(":")[0]
  title = getattr(load_experiment(path), "TITLE", Path(path).stem)
  cells = collect(runs, root)
  stem = Path(output) if output else Path(root) / "report"
  stem.parent.mkdir(parents=True, exist_ok=True)
  paths = {suffix: stem.with_name(stem.name + suffix) for suffix in (".md", ".csv", ".png")}
  text = markdown(title, experiment, cells, root)
  paths[".md"].write_text(text)
  paths[".csv"].write_text(csv_text(cells))
  plot(title, cells, paths[".png"])
  statuses = ("finished", "unfinished", "missing", "unreadable")
  counts = {s: sum(c.status == s for c in cells) for s in statuses}
  print(text)
  print(", ".join(f"{counts[s]} {s}" for s in statuses if counts[s] or s != "unreadable") +
        f" of {len(cells)} runs; wrote {', '.join(str(p) for p in paths.values())}")
  return paths
