"""Where the study's training runs run, and how workers share them.

A run is one (configuration, outer fold, inner fold) of the study, named by its `RunKey`
(``baseline_human/outer_0/fold_3``) and trained in ``<workdir>/runs/<key>``. Every process that
trains runs goes through `train_runs`: it claims a run (`xeno_jax.study.workdir.claim`), trains
it unless it is done, and moves on, so any number of workers (threads of this function in study
processes, local worker processes, cluster jobs) can share one work directory: each run is
trained by one of them, and a run whose worker died is taken over and resumes from its last
checkpoint.

Launchers (``config.launcher`` of the study config, see ``experiments/configs/study.py``):

- ``local``: ``launcher.workers`` processes on this machine. One worker is this process; more are
  started through submitit's local executor, each with its own ``launcher.gpus_per_run`` GPUs.
- ``submitit``: one job per missing run as a job array on ``launcher.cluster`` (``slurm``, or
  submitit's ``local`` / ``debug`` executors to try a study without a cluster), with partition,
  GPUs, CPUs, memory and time per run from the config.
- `run_commands`: one self-contained shell command per missing run, for any other scheduler.

In every case the study process waits for the runs and then evaluates and writes the report; a
study started again submits only what is neither done nor claimed by a live worker.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shlex
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections

from xeno_jax.study import banks, runs
from xeno_jax.study.configurations import apply_overrides, parse_configuration, run_config
from xeno_jax.study.workdir import claim, is_claimed

LAUNCHERS = ("local", "submitit")
CLUSTERS = ("slurm", "local", "debug")
CLAIMS_FILE = "claims.log"  # in each run directory: one line per training session


@dataclasses.dataclass(frozen=True, order=True)
class RunKey:
    """One training run of the study."""

    configuration: str
    outer: int
    fold: int

    def __str__(self) -> str:
        return f"{self.configuration}/outer_{self.outer}/fold_{self.fold}"

    @classmethod
    def parse(cls, text: str) -> RunKey:
        match = re.fullmatch(r"(?P<c>[^/]+)/outer_(?P<o>\d+)/fold_(?P<f>\d+)", text)
        if not match:
            raise ValueError(f"run {text!r}: expected <configuration>/outer_<i>/fold_<k>, e.g. "
                             "baseline_human/outer_0/fold_3")
        return cls(match["c"], int(match["o"]), int(match["f"]))

    def directory(self, workdir: str | os.PathLike) -> Path:
        return runs.runs_root(workdir, self.configuration, self.outer, self.fold)


def study_runs(config: ml_collections.ConfigDict) -> list[RunKey]:
    """Every training run of the study, in the study's order (a rule's runs are those of the
    baseline it relabels)."""
    trained = dict.fromkeys(parse_configuration(n).trained_as for n in config.configurations)
    return [RunKey(name, outer, fold) for name in trained
            for outer in config.outer_folds for fold in config.folds]


def run_configs(config: ml_collections.ConfigDict, configuration: str
                ) -> list[tuple[int, int, ml_collections.ConfigDict]]:
    """(outer, fold, run config) of every training run of a configuration in the study (a
    rule's: its baseline's; with a ``config.test_dataset``, the oracle's maps are learnt there,
    once)."""
    configuration = parse_configuration(configuration).trained_as
    base = run_config(config.run_config, configuration, quick=config.quick,
                      dataset=config.dataset, model=config.get("model", ""))
    base.data.data_dir = str(config.data_dir)
    base.data.spec = config.data.spec if "data" in config else ""
    spec = Path(os.path.expanduser(base.data.spec)) if base.data.spec else None
    if spec is not None and not spec.is_dir() and len(config.outer_folds) > 1:
        raise ValueError(f"config.data.spec={base.data.spec} is one spec file, but the study has "
                         f"outer folds {tuple(config.outer_folds)}: give a folder of the "
                         "reference's spec files (one per species and outer fold)")
    apply_overrides(base, config.overrides)  # unset placeholders keep the run's value
    parsed = parse_configuration(configuration)
    if (config.get("test_dataset") and parsed.is_projected and parsed.source == parsed.target
            and not base.augment.bank):  # the oracle: maps of the images it is tested on
        base.augment.bank = str(banks.ensure_bank(parsed.pathology, parsed.source,
                                                  config.test_dataset, config.data_dir))
    return [(outer, fold, runs.train_config_of(base, outer, fold))
            for outer in config.outer_folds for fold in config.folds]


def train_config(config: ml_collections.ConfigDict, key: RunKey) -> ml_collections.ConfigDict:
    """The training config of one run of the study."""
    for outer, fold, run in run_configs(config, key.configuration):
        if (outer, fold) == (key.outer, key.fold):
            return run
    raise ValueError(f"run {key} is not part of the study (outer folds {config.outer_folds}, "
                     f"folds {config.folds})")


def pending_runs(config: ml_collections.ConfigDict, workdir: str | os.PathLike, *,
                 reuse_stale: bool = False) -> list[RunKey]:
    """The study's runs that have not finished.

    Raises:
      StaleWorkError: for a run that finished with another config (unless `reuse_stale`).
    """
    return [key for key in study_runs(config) if not _finished(config, key, workdir, reuse_stale)]


def _finished(config: ml_collections.ConfigDict, key: RunKey, workdir: str | os.PathLike,
              reuse_stale: bool) -> bool:
    """Whether `key` finished with its current config (`runs.finished`)."""
    directory = key.directory(workdir)
    return runs.is_done(directory) and runs.finished(train_config(config, key), directory,
                                                     reuse_stale=reuse_stale)


def train_runs(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
               keys: Sequence[RunKey], *, reuse_stale: bool = False) -> list[RunKey]:
    """Trains those of `keys` that are not done, each by whichever worker claims it first.

    First every run no other worker holds is claimed and trained in turn; then the worker waits
    for the runs others hold, and trains (resumes) any whose holder died before it finished.

    Returns:
      The runs this call trained.

    Raises:
      StaleWorkError: for a run that finished, or has checkpoints, made with another config
        (unless `reuse_stale`).
    """
    trained = []
    for wait in (False, True):
        for key in keys:
            if _finished(config, key, workdir, reuse_stale):
                continue
            directory = key.directory(workdir)
            with claim(directory, wait=wait) as obtained:
                if obtained and not runs.is_done(directory):
                    _train_claimed(config, key, directory, reuse_stale)
                    trained.append(key)
    return trained


def _train_claimed(config: ml_collections.ConfigDict, key: RunKey, directory: Path,
                   reuse_stale: bool) -> None:
    checkpoints = directory / "checkpoints"  # orbax: one folder per finished step
    steps = [int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()] if (
        checkpoints.is_dir()) else []
    session = f"resume from step {max(steps)}" if steps else "start"
    logging.info("training %s: %s", key, session)
    if jax.process_index() == 0:  # one line per session, also of a multi-process run
        with open(directory / CLAIMS_FILE, "a", encoding="utf-8") as log:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {socket.gethostname()} "
                      f"pid {os.getpid()}: {session}\n")
    runs.train_run(train_config(config, key), directory, reuse_stale=reuse_stale)


def worker(config: ml_collections.ConfigDict, workdir: str, keys: Sequence[RunKey],
           reuse_stale: bool = False) -> list[RunKey]:
    """A worker process's job (submitit pickles it): logs at INFO, then `train_runs`."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger().setLevel(logging.INFO)
    logging.info("worker %s pid %d: %d runs", socket.gethostname(), os.getpid(), len(keys))
    return train_runs(config, workdir, keys, reuse_stale=reuse_stale)


def launch(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
           launcher: str = "local", *, reuse_stale: bool = False) -> None:
    """Trains the study's missing runs with `launcher` and returns when all are done.

    Raises:
      RuntimeError: when runs are still missing at the end (a worker or job failed); names
        them and where the logs are.
      StaleWorkError: for a run that finished with another config (unless `reuse_stale`).
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"--launcher={launcher!r}: expected one of {LAUNCHERS}")
    workdir = Path(workdir)
    pending = pending_runs(config, workdir, reuse_stale=reuse_stale)
    logging.info("%d of %d runs to train", len(pending), len(study_runs(config)))
    if not pending:
        return
    settings = config.launcher
    if launcher == "local" and settings.workers <= 1:
        train_runs(config, workdir, pending, reuse_stale=reuse_stale)
    else:
        jobs = _submit(config, workdir, pending, launcher, reuse_stale)
        for job in jobs:
            try:
                job.result()
            except Exception as error:
                logging.error("job %s failed: %s", job.job_id, error)
        if launcher == "local":  # a dead worker's runs are finished here, on the same machine
            train_runs(config, workdir, pending, reuse_stale=reuse_stale)
        else:  # runs still held by jobs of an earlier submission; failed ones are resubmitted
            for key in pending:  # when the study is started again, not trained here
                with claim(key.directory(workdir), wait=True):
                    pass
    missing = pending_runs(config, workdir, reuse_stale=reuse_stale)
    if missing:
        raise RuntimeError(f"runs not finished: {[str(k) for k in missing]}; logs in "
                           f"{workdir / 'jobs'} and each run's {CLAIMS_FILE}")


def _submit(config, workdir: Path, pending: Sequence[RunKey], launcher: str, reuse_stale: bool):
    import submitit  # only for the launchers that submit

    settings = config.launcher
    folder = workdir / "jobs" / "%j"
    if launcher == "local":  # `workers` processes that share the pending runs
        executor = submitit.LocalExecutor(folder)
        jobs = []
        for i in range(settings.workers):
            gpus = settings.gpus_per_run
            executor.update_parameters(timeout_min=settings.timeout_min * len(pending),
                                       gpus_per_node=gpus,
                                       visible_gpus=tuple(range(i * gpus, (i + 1) * gpus)))
            shifted = [*pending[i::settings.workers], *pending]  # each starts elsewhere
            jobs.append(executor.submit(worker, config, str(workdir),
                                        list(dict.fromkeys(shifted)), reuse_stale))
        return jobs
    if settings.cluster not in CLUSTERS:
        raise ValueError(f"config.launcher.cluster={settings.cluster!r}: expected one of "
                         f"{CLUSTERS}")
    # Runs held by a live worker (e.g. a job of an earlier submission) are not submitted again.
    free = [key for key in pending if not is_claimed(key.directory(workdir))]
    executor = submitit.AutoExecutor(folder, cluster=settings.cluster)
    if settings.cluster == "slurm":
        executor.update_parameters(
            name="xeno_study", timeout_min=settings.timeout_min, mem_gb=settings.mem_gb,
            gpus_per_node=settings.gpus_per_run, cpus_per_task=settings.cpus_per_run,
            tasks_per_node=1, nodes=1, slurm_array_parallelism=settings.array_parallelism,
            **({"slurm_partition": settings.partition} if settings.partition else {}))
    elif settings.cluster == "local":
        executor.update_parameters(timeout_min=settings.timeout_min)
    logging.info("submitting %d runs to %s", len(free), settings.cluster)
    return executor.map_array(worker, [config] * len(free), [str(workdir)] * len(free),
                              [[key] for key in free], [reuse_stale] * len(free))


def run_commands(argv: Sequence[str], config: ml_collections.ConfigDict,
                 workdir: str | os.PathLike, *, reuse_stale: bool = False) -> list[str]:
    """One shell command per missing run: the study command `argv` with ``--run=<key>``.

    `argv` is the study's own command line (``sys.argv``, relative paths from the current
    folder, which each command changes to first); ``--print_runs``, ``--launcher`` and
    ``--run`` are dropped from it. Each command trains its run (claimed, so a command started
    twice trains once); the one that finishes the last run evaluates and writes the report.
    """
    drop = re.compile(r"^--(no)?(print_runs|launcher|run)(=.*)?$")
    args, skip_value = [], False
    for arg in argv[1:]:
        if skip_value:
            skip_value = False
        elif drop.match(arg):
            skip_value = arg in ("--launcher", "--run")  # the value is the next argument
        else:
            args.append(arg)
    study = [sys.executable, "-m", "experiments.study", *args]
    return [f"cd {shlex.quote(os.getcwd())} && {shlex.join([*study, f'--run={key}'])}"
            for key in pending_runs(config, workdir, reuse_stale=reuse_stale)]
