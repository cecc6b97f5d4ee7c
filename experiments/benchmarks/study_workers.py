"""Wall time of a tiny study with 1 and with N local workers, and the full study's arithmetic.

  python experiments/benchmarks/study_workers.py                 # 1 vs 2 workers, 2 x 2 runs
  python experiments/benchmarks/study_workers.py --workers=1,2,4 --folds=0,1,2,3

What it measures: ``python -m experiments.study --launcher=local
--config.launcher.workers=<n>`` on the quick ``demo`` study at ``sim_tiny`` size (two
configurations, outer fold 0, the given inner folds: 2 x len(folds) runs of ``--steps`` steps),
each time in a fresh work directory that shares one data directory (datasets and the projection
bank are built once beforehand, not timed). Worker counts are measured in turn, in the order
given, then in reverse in the next of ``--repeats`` rounds, and each count's best wall time is
printed with the speed-up over one worker. Every run's training time (its claim to its
``done.json``) gives the mean time per run, from which it prints the full study's time
(11 configurations x 3 outer x 5 inner folds = 165 runs) on N workers:
``ceil(165 / N) * t_run``, the same arithmetic as for N GPUs with one run per GPU, with t_run
measured on an accelerator. Absolute times are labelled [CPU] and describe this machine and its
load (printed): on 2 cores, 2 workers share the cores that 1 worker's XLA threads already use.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY))

from experiments.benchmarks.input_pipeline import load_average  # noqa: E402

FULL_STUDY_RUNS = 11 * 3 * 5


def study_command(workdir: Path, data_dir: Path, folds: str, steps: int, workers: int):
    return [sys.executable, "-m", "experiments.study",
            "--config=experiments/configs/study.py:demo,sim_tiny", f"--config.folds=({folds},)",
            "--config.test_sets=('physiological',)", f"--config.data_dir={data_dir}",
            "--config.overrides.train.epochs=1",
            f"--config.overrides.train.epoch_size={8 * steps}",
            "--launcher=local", f"--config.launcher.workers={workers}", f"--workdir={workdir}"]


def run_seconds(workdir: Path) -> list[float]:
    """Per run: from its claim (claims.log) to its done.json."""
    seconds = []
    for claims in workdir.glob("runs/*/*/*/claims.log"):
        start = datetime.datetime.strptime(claims.read_text().split()[0], "%Y-%m-%dT%H:%M:%S")
        done = (claims.parent / "done.json").stat().st_mtime
        seconds.append(done - start.timestamp())
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2", help="worker counts to compare")
    parser.add_argument("--folds", default="0,1", help="inner folds (2 runs each)")
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds, alternately in the given and the reverse order")
    args = parser.parse_args()
    counts = [int(n) for n in args.workers.split(",")]
    print(load_average())
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    with tempfile.TemporaryDirectory(prefix="study_workers_") as folder:
        folder = Path(folder)
        data_dir = folder / "tfds"
        print("building datasets and the bank (not timed) ...", flush=True)
        subprocess.run([sys.executable, "-c", (
            "from xeno_jax.study import banks, datasets\n"
            "for s in ('human', 'pig'):\n"
            f"    datasets.ensure_dataset(s, 'sim_tiny', {str(data_dir)!r})\n"
            f"banks.ensure_bank('malperfusion', 'pig', 'sim_tiny', {str(data_dir)!r})")],
            cwd=REPOSITORY, env=env, check=True, capture_output=True)
        walls = {n: [] for n in counts}
        per_run = []
        order = [n for r in range(args.repeats) for n in (counts[::-1] if r % 2 else counts)]
        for i, n in enumerate(order):
            workdir = folder / f"study_{i}_{n}"
            started = time.perf_counter()
            subprocess.run(study_command(workdir, data_dir, args.folds, args.steps, n),
                           cwd=REPOSITORY, env=env, check=True, capture_output=True)
            walls[n].append(time.perf_counter() - started)
            per_run += run_seconds(workdir)
            print(f"  {n} worker(s): {walls[n][-1]:.1f} s [CPU]  ({load_average()})", flush=True)
    runs = 2 * len(args.folds.split(","))
    best_one = min(walls[counts[0]])
    print(f"\ntiny study: {runs} runs of {args.steps} steps, quick model, sim_tiny")
    for n in counts:
        print(f"  {n} worker(s): best {min(walls[n]):.1f} s [CPU], speed-up over "
              f"{counts[0]}: {best_one / min(walls[n]):.2f}")
    t_run = sum(per_run) / len(per_run)
    print(f"mean time per run (claim to done, compile included): {t_run:.1f} s [CPU]")
    print(f"full study ({FULL_STUDY_RUNS} runs) at this time per run:")
    for n in (1, 8, 16, 33, 55, 165):
        print(f"  {n:3d} workers/GPUs: ceil(165/{n}) x t_run = "
              f"{math.ceil(FULL_STUDY_RUNS / n) * t_run / 3600:.2f} h")


if __name__ == "__main__":
    main()
