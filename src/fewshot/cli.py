"""What fewshot-train and fewshot-eval share (fewshot.train, fewshot.eval): bad input and failures reported as
one line on stderr (the traceback with HYDRA_FULL_ERROR=1), a bad override caught before Hydra starts, and
failed sweep jobs counted (fewshot.sweep)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

from hydra.errors import InstantiationException

from fewshot import sweep
from fewshot.config import register_configs
from fewshot.errors import CHECKPOINT_HINT, ConfigError, FewshotError

register_configs()
CONFIG_PATH = "pkg://fewshot.conf"  # the config tree ships as a package: found from any working folder
# Settings a command cannot run without (??? in its config), with what the one-line error suggests
MANDATORY = {"checkpoint": CHECKPOINT_HINT}


def one_line(message: str) -> str:
    """Hydra's multi-line composition errors as one line: what is wrong and the available choices."""
    noise = ("full_key:", "reference_type", "object_type", "To append to your config", "Set the environment variable")
    lines = []
    for line in str(message).splitlines():
        line = line.strip()
        if line.startswith("Config search path"):
            break
        if line and not line.startswith(noise):
            lines.append(line)
    text = " ".join(lines).replace(": ", ": ", 1)
    return text.replace("Available options in", "; available options in").replace(" ;", ";")


def unset_keys(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys left at ??? in a plain container. Not OmegaConf.missing_keys: it resolves every value, and
    an interpolation only a running job can resolve (data_root=${hydra:runtime.cwd}/data) would fail here."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    keys = []
    for k, value in items:
        keys += [f"{prefix}{k}"] if value == "???" else unset_keys(value, f"{prefix}{k}.")
    return keys


def _precheck(prog: str, config_name: str) -> None:
    """Compose once before Hydra's own run so that a bad override is reported as one line.

    For a multirun sweep only the settings common to all its jobs (a bad value swept over fails its own job,
    sweep.TolerantSweeper). Skipped for Hydra's info flags."""
    from hydra import compose, initialize_config_module
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    args, _ = get_args_parser().parse_known_args()
    if args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return
    try:
        overrides, swept = args.overrides, set()
        if args.multirun:
            parsed = OverridesParser.create().parse_overrides(overrides)
            overrides = [o.input_line for o in parsed if not o.is_sweep_override()]
            swept = {o.key_or_group for o in parsed if o.is_sweep_override()}
        with initialize_config_module(config_module="fewshot.conf", version_base="1.3"):
            cfg = compose(config_name, overrides=overrides)
        missing = [key for key in unset_keys(OmegaConf.to_container(cfg, resolve=False)) if key not in swept]
        if missing:  # else the job's first read of it fails with omegaconf's traceback (fewshot-eval's checkpoint)
            unset = (f"{key} is not set: pass {key}={MANDATORY.get(key, 'VALUE')}" for key in missing)
            raise ConfigError("; ".join(unset))
    except (HydraException, OmegaConfBaseException, ConfigError) as e:
        if sweep.full_error():
            return  # let Hydra report it in full
        cause = f"\n{e.__cause__}" if e.__cause__ is not None and str(e.__cause__) not in str(e) else ""
        print(f"{prog}: error: {one_line(str(e) + cause)}", file=sys.stderr)
        sys.exit(2)
    finally:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()


# What a task reports in one line; anything else is a bug and keeps its traceback.
HANDLED = (FewshotError, InstantiationException, OSError)  # OSError: a full disk, a read-only folder


def report(prog: str, error: BaseException) -> None:
    """One line on stderr and a non-zero exit (2, or 128+signal after a preemption); the traceback
    only with HYDRA_FULL_ERROR=1. In a multirun sweep a failed job is reported and recorded, and the sweep
    goes on with the next job (sweep.FewshotCallback lists the failures at the end); a preemption stops it."""
    if sweep.full_error():
        raise error
    if isinstance(error, InstantiationException) and isinstance(error.__cause__, (FewshotError, OSError)):
        error = error.__cause__  # our own message, without Hydra's "Error in call to target ..." wrapper
    message = sweep.describe_os_error(error) if isinstance(error, OSError) else one_line(str(error))
    if sweep.in_multirun():
        if hasattr(error, "exit_code"):  # a preemption (engine.Interrupted, 128+signal) stops the whole sweep
            message = sweep.resume_hint(message)
        elif sweep.job_failed(prog, message):
            return
    print(f"{prog}: error: {message}", file=sys.stderr)
    if hasattr(error, "exit_code") and not sweep.in_multirun():
        exit_now(error.exit_code)
    sys.exit(getattr(error, "exit_code", 2))


def exit_now(code: int) -> None:
    """Exit with `code` after a preemption, without the interpreter's teardown. A signal can stop the test phase
    while MAML's worker threads have been running torch on a CPU, and the C++ teardown then sometimes aborted
    ("terminate called without an active exception", exit -6 where 128+signal was due: once in clean-clone CI, and in
    the 7th run of a loop of tests/test_faults.py's test-phase case, none in the next 60; root cause not found).
    Everything a run saves is written before the error is raised; logs and streams are flushed here."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def main(prog: str, config_name: str, job: Callable[[], Any]) -> None:
    """A console command: compose once to report a bad override in one line, run the Hydra job, and exit 1
    when a sweep went on past failed jobs (listed above)."""
    _precheck(prog, config_name)
    job()
    if sweep.failed_jobs:
        sys.exit(1)


def train_main() -> None:  # kept for `python -m fewshot.cli train` and older installs
    from fewshot.train import main as run_main

    run_main()


def eval_main() -> None:
    from fewshot.eval import main as run_main

    run_main()


def table_main() -> None:
    from fewshot.table import main

    sys.exit(main())


if __name__ == "__main__":  # `python -m fewshot.cli train|eval|table ...` where the console scripts are not installed
    command = sys.argv.pop(1) if len(sys.argv) > 1 else ""
    mains = {"train": train_main, "eval": eval_main, "table": table_main}
    if command not in mains:
        sys.exit("usage: python -m fewshot.cli {train,eval,table} [overrides...]")
    sys.argv[0] = f"fewshot-{command}"
    mains[command]()
