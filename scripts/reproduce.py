#!/usr/bin/env python
"""Run a whole paper table as one Hydra multirun, then print it with fewshot-table.

    python scripts/reproduce.py maml-omniglot                      # the four cells x 3 seeds, paper budget
    python scripts/reproduce.py protonet-omniglot --seeds 0 -- trainer.iterations=2000   # a reduced budget
    python scripts/reproduce.py maml-omniglot --launcher slurm -- hydra.launcher.partition=gpu
    python scripts/reproduce.py --list

Everything after `--` is passed to every job as Hydra overrides. The sweep folder is
outputs/reproduce/<table>/<date>_<time> unless --out is given; the table is written beside it.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

CELLS = ["5w1s", "5w5s", "20w1s", "20w5s"]
TABLES = {
    "maml-omniglot": [f"maml_omniglot_{c}" for c in CELLS],
    "fomaml-omniglot": [f"fomaml_omniglot_{c}" for c in CELLS],
    "maml-miniimagenet": [f"{a}_miniimagenet_5w{k}s" for a in ("maml", "fomaml") for k in (1, 5)],
    "matching-omniglot": [f"{a}_omniglot_{c}" for a in ("matching", "matching_fce") for c in CELLS],
    "matching-miniimagenet": [f"{a}_miniimagenet_5w{k}s" for a in ("matching", "matching_fce") for k in (1, 5)],
    "protonet-omniglot": [f"protonet_omniglot_{c}" for c in CELLS],
    "protonet-miniimagenet": [f"protonet_miniimagenet_5w{k}s" for k in (1, 5)],
    "siamese-omniglot": [f"siamese_omniglot_{c}" for c in CELLS] + ["siamese_omniglot_lake_20w1s"],
    "mann-omniglot": ["mann_omniglot_5way", "lstm_baseline_omniglot_5way"],
    "meta-lstm": [f"meta_lstm_{d}_5w{k}s" for d in ("omniglot", "miniimagenet") for k in (1, 5)],
    "reptile-omniglot": [f"reptile_omniglot_{c}" for c in CELLS],
    "meta-sgd-omniglot": [f"meta_sgd_omniglot_{c}" for c in CELLS],
    "meta-sgd-miniimagenet": [f"meta_sgd_miniimagenet_5w{k}s" for k in (1, 5)],
    "maml-pp-omniglot": [f"maml_pp_omniglot_{c}" for c in CELLS],
    "anil": [f"anil_omniglot_20w{k}s" for k in (1, 5)] + [f"anil_miniimagenet_5w{k}s" for k in (1, 5)],
}


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("table", nargs="?", choices=sorted(TABLES))
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--launcher", default="local", help="conf/launcher choice: local, joblib or slurm")
    p.add_argument("--out", help="sweep folder (default outputs/reproduce/<table>/<timestamp>)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--list", action="store_true", help="list the tables and their presets")
    args = p.parse_args(argv)
    if args.list or not args.table:
        for name, presets in TABLES.items():
            print(f"{name}: {', '.join(presets)}")
        return 0 if args.list else 2
    out = Path(args.out or f"outputs/reproduce/{args.table}/{time.strftime('%Y-%m-%d_%H-%M-%S')}")
    bin_dir = Path(sys.executable).parent
    train = [
        str(bin_dir / "fewshot-train"),
        "-m",
        f"experiment={','.join(TABLES[args.table])}",
        f"seed={args.seeds}",
        f"launcher={args.launcher}",
        f"hydra.sweep.dir={out}",
        *extra,
    ]
    table = [
        str(bin_dir / "fewshot-table"),
        str(out),
        "--csv",
        str(out / "table.csv"),
        "--plot",
        str(out / "table.png"),
    ]
    for cmd in (train, table):
        print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
        if not args.dry_run:
            code = subprocess.call(cmd)
            if code != 0:
                return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
