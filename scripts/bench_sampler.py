#!/usr/bin/env python
"""Episode sampling throughput: fewshot's device-resident EpisodeSampler vs learn2learn's TaskDataset.

Both draw the same kind of task from the same images (Omniglot's Finn train split by default:
5-way, 1 support + 15 query images per class, a random 0/90/180/270 rotation per class) in the same
process. Prints one JSON object per setting and a summary with the ratio ours / learn2learn.

    python scripts/bench_sampler.py [--device cpu|cuda] [--dataset omniglot|synthetic] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

from fewshot.data.omniglot import load_omniglot
from fewshot.data.sampler import EpisodeSampler
from fewshot.data.synthetic import load_synthetic


def rate(fn, tasks_per_call: int, seconds: float, sync) -> float:
    """Tasks per second over at least `seconds` of repeated calls (after one warm-up call)."""
    fn()
    sync()
    n, tic = 0, time.perf_counter()
    while time.perf_counter() - tic < seconds:
        fn()
        n += 1
    sync()
    return n * tasks_per_call / (time.perf_counter() - tic)


def l2l_taskset(bank, ways: int, per_class: int, rotate: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import learn2learn as l2l

    classes, per, c, h, w = bank.images.shape
    images = bank.images.reshape(classes * per, c, h, w)
    labels = torch.arange(classes).repeat_interleave(per)

    class Flat(torch.utils.data.Dataset):  # what a user hands to l2l: one (image, label) per index
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return images[i].float().div(255), int(labels[i])

    labels_to_indices = {k: list(range(k * per, (k + 1) * per)) for k in range(classes)}
    meta = l2l.data.MetaDataset(Flat(), labels_to_indices=labels_to_indices)
    transforms = [
        l2l.data.transforms.NWays(meta, ways),
        l2l.data.transforms.KShots(meta, per_class),
        l2l.data.transforms.LoadData(meta),
        l2l.data.transforms.RemapLabels(meta),
        l2l.data.transforms.ConsecutiveLabels(meta),
    ]
    if rotate:
        # learn2learn's own class augmentation, as its Omniglot benchmark uses.
        transforms.append(l2l.vision.transforms.RandomClassRotation(meta, [0.0, 90.0, 180.0, 270.0]))
    return l2l.data.TaskDataset(meta, task_transforms=transforms, num_tasks=-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dataset", default="omniglot", choices=["omniglot", "synthetic"])
    p.add_argument("--data-root", default=os.environ.get("FEWSHOT_DATA_ROOT", "./data"))
    p.add_argument("--cache-dir", default=os.environ.get("FEWSHOT_CACHE_DIR", os.path.expanduser("~/.cache/fewshot")))
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_sampler: --device cuda but no CUDA device is available")
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    timings = {}
    if args.dataset == "omniglot":
        tic = time.perf_counter()
        data = load_omniglot(os.path.join(args.data_root, "omniglot"), args.cache_dir)
        timings["omniglot_load_s"] = round(time.perf_counter() - tic, 3)
    else:
        data = load_synthetic()
    bank = data.split("train")
    per_class = args.shots + args.queries
    summary = []
    for rotate in [bank.rotate, False] if bank.rotate else [False]:
        bank_r = type(bank)(bank.images, bank.class_names, rotate=rotate)
        ours = EpisodeSampler(bank_r, args.ways, args.shots, args.queries, device=device, seed=0)
        ours_rate = rate(lambda: ours.sample(args.meta_batch), args.meta_batch, args.seconds, sync)
        taskset = l2l_taskset(bank_r, args.ways, per_class, rotate)
        l2l_rate = rate(taskset.sample, 1, args.seconds, lambda: None)
        row = {
            "setting": f"{args.dataset} train, {args.ways}-way {args.shots}-shot {args.queries}-query, rotate={rotate}",
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "classes": bank.num_classes,
            "meta_batch": args.meta_batch,
            "ours_tasks_per_s": round(ours_rate, 1),
            "l2l_tasks_per_s": round(l2l_rate, 1),
            "ratio": round(ours_rate / l2l_rate, 1),
        }
        print(json.dumps(row), flush=True)
        summary.append({"rotate": rotate, "ratio": row["ratio"]})
    print(json.dumps({"summary": summary, **timings, "torch": torch.__version__, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
