"""Hydra hooks for the entrypoints: run and sweep folders checked before Hydra writes into them, and multirun sweeps
that report a failed job in one line, go on with the others and list the failures at the end.

Registered in conf/hydra/default.yaml (hydra.callbacks.fewshot). A job records its failure as one line in
<sweep dir>/failed_jobs.txt (jobs may run in other processes: joblib, SLURM); the summary is read from there."""

from __future__ import annotations

import errno
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.plugins import Plugins
from hydra.experimental.callback import Callback

Plugins.instance()  # first: its plugin scan re-executes basic_sweeper, which would orphan a subclass made before it
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # noqa: E402
from omegaconf import DictConfig, read_write  # noqa: E402

FAILED_JOBS = "failed_jobs.txt"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# Hydra instantiates sweepers only under a hydra_plugins.* name (Plugins._instantiate); TolerantSweeper is
# registered under this one by the callback instead of shipping a separate hydra_plugins package.
TOLERANT_SWEEPER = "hydra_plugins.fewshot_sweeper.TolerantSweeper"
# Errors that only writing causes: their message says "cannot write" rather than "cannot access".
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}

# The engine's advice on how to go on after a signal ("resume with the same command and hydra.run.dir=<job folder>",
# "run the same command ..."): right for a single run, but in a sweep it would start a new sweep.
RERUN_HINT = re.compile(r"; (?:resume with|run the same command)\b")

failed_jobs: list[str] = []  # after a sweep, in the process that ran it: one line per failed job
# In a job's process, from FewshotCallback.on_job_start: the sweep's overrides (for the resume hint), and whether
# the sweep goes on past a failed job (TolerantSweeper does; Optuna's would end in a traceback if every trial failed).
_sweep_command: Optional[list[str]] = None
_goes_on = False


def full_error() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def describe_os_error(error: OSError) -> str:
    """One line naming the file and what the errno means, e.g. 'cannot write x/best.pt: No space left on device'
    (fewshot.atomic.atomic_write names the file it was writing, also for errors of write() and fsync())."""
    reason = error.strerror or (os.strerror(error.errno) if error.errno else str(error))
    if error.filename is None:
        return reason
    verb = "cannot write" if error.errno in WRITE_ERRNOS else "cannot access"
    return f"{verb} {os.fsdecode(error.filename)}: {reason}"


def check_folder(folder: Path | str, what: str) -> Optional[str]:
    """Create `folder` and a file in it, as Hydra is about to (its log file); the one-line problem, or None."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create {what} {folder}: {e.strerror or e}"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return f"cannot write in {what} {folder}: {e.strerror or e}"
    return None


def _stop(prog: str, message: str) -> None:
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(2)


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def swept(job_overrides: Sequence[str], sweep_overrides: Optional[Sequence[str]]) -> str:
    """A job's own settings: its overrides that the sweep command does not give verbatim (seed=1 of seed=1,2)."""
    own = [o for o in job_overrides if sweep_overrides is None or o not in sweep_overrides]
    return " ".join(own or job_overrides)


def record_failure(prog: str, sweep_dir: Path | str, num: int, overrides: str, message: str) -> None:
    """Print a failed job's one line and append it to <sweep dir>/failed_jobs.txt for the summary."""
    print(f"{prog}: job #{num} ({overrides}) failed: {message}", file=sys.stderr)
    try:  # one short write in append mode: whole lines even when parallel jobs fail together
        with open(Path(sweep_dir) / FAILED_JOBS, "a", encoding="utf-8") as f:
            f.write(f"#{num} ({overrides}): {message}\n")
    except OSError as e:
        print(f"{prog}: warning: cannot record the failure in {sweep_dir}: {describe_os_error(e)}", file=sys.stderr)


def job_failed(prog: str, message: str) -> bool:
    """The running multirun job failed: report and record it and return True when the sweep goes on with the next
    job; False where a failed job still stops the sweep (other sweepers than the basic one)."""
    from hydra.core.hydra_config import HydraConfig

    if not _goes_on:
        return False
    hc = HydraConfig.get()
    record_failure(prog, _sweep_dir(), hc.job.num, swept(list(hc.overrides.task), _sweep_command), message)
    return True


def _sweep_dir() -> str:
    """The running job's sweep folder, absolute: with hydra.job.chdir=true the job runs in its own folder."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    return os.path.join(hc.runtime.cwd, hc.sweep.dir)


def resume_hint(message: str) -> str:
    """An interrupted multirun job: the engine's 'resume with ... hydra.run.dir=<job folder>' would start a new
    sweep; only the same command with the same hydra.sweep.dir resumes this one."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    args = _sweep_command if _sweep_command is not None else [a for a in sys.argv[1:] if not a.startswith("-")]
    args = [a for a in args if not _is_key(a, "hydra.sweep.dir", "hydra.mode")]
    command = shlex.join([f"fewshot-{hc.job.config_name}", "-m", *args, f"hydra.sweep.dir={_sweep_dir()}"])
    head = RERUN_HINT.split(message, 1)[0]
    return f"{head}; resume the sweep with: {command}"


def _is_key(override: str, *keys: str) -> bool:
    key = override.split("=", 1)[0].lstrip("+~")
    return key in keys


class FewshotCallback(Callback):
    """Checks the run or sweep folder before Hydra writes into it, and keeps a sweep going past failed jobs."""

    def __init__(self) -> None:
        self.sweep_command: Optional[list[str]] = None
        self.goes_on = False

    def on_run_start(self, config: DictConfig, config_name: Optional[str] = None, **kwargs: Any) -> None:
        # Hydra creates the folder and opens its log file there next; an OSError then is a multi-line traceback.
        if not full_error():
            problem = check_folder(config.hydra.run.dir, "run folder")
            if problem:
                _stop(f"fewshot-{config_name}", problem)

    def on_multirun_start(self, config: DictConfig, config_name: Optional[str] = None, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not full_error():
            problem = check_folder(sweep_dir, "sweep folder")
            if problem:
                _stop(f"fewshot-{config_name}", problem)
        (sweep_dir / FAILED_JOBS).unlink(missing_ok=True)  # a rerun of the sweep lists only its own failures
        failed_jobs.clear()
        self.sweep_command = [*config.hydra.overrides.task, *config.hydra.overrides.hydra]
        self.goes_on = config.hydra.sweeper.get("_target_") == BASIC_SWEEPER
        if self.goes_on:
            _use_tolerant_sweeper(config)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _sweep_command, _goes_on
        # This callback travels to the job's process (joblib, SLURM) with what on_multirun_start learned.
        _sweep_command, _goes_on = self.sweep_command, self.goes_on

    def on_multirun_end(self, config: DictConfig, config_name: Optional[str] = None, **kwargs: Any) -> None:
        path = Path(config.hydra.sweep.dir) / FAILED_JOBS
        try:
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        except FileNotFoundError:
            return
        lines.sort(key=lambda ln: int(re.match(r"#(\d+)", ln)[1]) if re.match(r"#\d+", ln) else 0)  # job order
        failed_jobs[:] = lines
        prog = f"fewshot-{config_name}"
        jobs = "1 job" if len(lines) == 1 else f"{len(lines)} jobs"
        print(f"{prog}: {jobs} of the sweep failed (listed in {path}):", file=sys.stderr)
        for line in lines:
            print(f"{prog}:   {line}", file=sys.stderr)


def _use_tolerant_sweeper(config: DictConfig) -> None:
    """Hydra's basic sweeper, but a job whose config does not compose is reported and skipped (the sweeper
    is instantiated from this config right after on_multirun_start). Other sweepers (Optuna) are left alone."""
    Plugins.instance().class_name_to_class[TOLERANT_SWEEPER] = TolerantSweeper
    with read_write(config.hydra.sweeper):
        config.hydra.sweeper._target_ = TOLERANT_SWEEPER


class TolerantSweeper(BasicSweeper):
    """BasicSweeper whose batches skip the jobs that fail to compose (a bad value such as episode.ways=five):
    each is reported in one line and recorded, the others run under their own job numbers."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        pass  # _SkipUncomposable composes each job itself and skips those that fail

    def setup(self, **kwargs: Any) -> None:
        super().setup(**kwargs)
        self.launcher = _SkipUncomposable(self.launcher, self)


class _SkipUncomposable:
    """Wraps the sweep's launcher: launches the runs of composable jobs between the failed ones, each run with
    its first job's number, so the numbering is the same as without the failures."""

    def __init__(self, launcher: Any, sweeper: Any) -> None:
        self.launcher, self.sweeper = launcher, sweeper

    def __getattr__(self, name: str) -> Any:
        return getattr(self.launcher, name)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list:
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        from fewshot.cli import one_line

        config, loader = self.sweeper.config, self.sweeper.hydra_context.config_loader
        results: list = []
        run: list[Sequence[str]] = []
        start = initial_job_idx

        def flush() -> None:
            if run:
                results.extend(self.launcher.launch(list(run), initial_job_idx=start))
                run.clear()

        for i, overrides in enumerate(job_overrides):
            num = initial_job_idx + i
            try:
                loader.load_sweep_config(master_config=config, sweep_overrides=list(overrides))
            except (HydraException, OmegaConfBaseException) as e:
                if full_error():
                    raise
                flush()
                cause = f"\n{e.__cause__}" if e.__cause__ is not None and str(e.__cause__) not in str(e) else ""
                prog = f"fewshot-{config.hydra.job.config_name}"
                shown = swept(list(overrides), list(config.hydra.overrides.task))
                record_failure(prog, config.hydra.sweep.dir, num, shown, one_line(str(e) + cause))
                continue
            if not run:
                start = num
            run.append(overrides)
        flush()
        return results
