"""Verifying a checkpoint on resume: lm2's verify (files split by bytes over threads, sha256 and the pickle scan)
against the reference, one thread hashing every file in turn (what resume did per rank before), in the same run.

The checkpoint is a fake of `--gb` GB shaped like a ZeRO-1 run's: one model-states file holding half the bytes and
`--partitions` optimizer partitions sharing the rest, each a torch.save of random tensors, with a manifest. Before
every timed call its files are dropped from the page cache (posix_fadvise DONTNEED on these files only), so each
subject reads them from the disk; `--hot` keeps them cached (then the sha256 work alone is timed).

    python bench/verify_checkpoint.py --gb 1.0 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
from measure import interleaved, median_ratio

from lm2.pipeline.checkpoint.format import Layout, Manifest, tag_for, write_manifest
from lm2.pipeline.checkpoint.verify import Team, default_threads, shares_by_bytes, verify
from lm2.pipeline.files import sha256_file


def fake_checkpoint(root: Path, total_bytes: int, partitions: int) -> Path:
    folder = root / tag_for(1)
    folder.mkdir(parents=True)
    sizes = {"mp_rank_00_model_states.pt": total_bytes // 2}
    sizes.update(
        {f"zero_pp_rank_{i}_mp_rank_00_optim_states.pt": total_bytes // 2 // partitions for i in range(partitions)}
    )
    generator = torch.Generator().manual_seed(0)
    for name, size in sizes.items():
        torch.save({"tensor": torch.randn(size // 4, generator=generator)}, folder / name)
    table = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in folder.iterdir()}
    manifest = Manifest(step=1, layout=Layout(tp=1, pp=1, dp=partitions, zero_stage=1), config={}, files=table)
    write_manifest(folder, manifest)
    return folder


def drop_from_page_cache(folder: Path) -> None:
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def one_thread_in_turn(folder: Path) -> None:
    for path in sorted(folder.iterdir()):
        if path.name != "lm2_manifest.json":
            sha256_file(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=1.0, help="checkpoint size in GB (1e9 bytes)")
    parser.add_argument("--partitions", type=int, default=8, help="optimizer partition files (the DP size)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=default_threads(), help="verify's threads (default: its own)")
    parser.add_argument("--hot", action="store_true", help="keep the files in the page cache")
    parser.add_argument("--dir", default=None, help="where to write the fake checkpoint (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = fake_checkpoint(Path(tmp), int(args.gb * 1e9), args.partitions)
        team = Team(threads=args.threads)
        reports = []

        def cold(subject):
            def run():
                if not args.hot:
                    drop_from_page_cache(folder)
                return subject()

            return run

        seconds = interleaved(
            {
                "one_thread": cold(lambda: one_thread_in_turn(folder)),
                "verify": cold(lambda: reports.append(verify(folder, team))),
            },
            args.rounds,
            warmup=0,
        )
        sizes = {name: entry["bytes"] for name, entry in reports[-1].manifest.files.items()}
        # In a job of 2 ranks, the most bytes one worker hashes in turn (the critical path): now split by bytes over
        # every rank's threads; before, every other file (by name) to each rank, hashed by one thread.
        by_bytes = max(sum(sizes[n] for n in share) for share in shares_by_bytes(sizes, 2 * args.threads))
        names = sorted(sizes)
        by_count = max(sum(sizes[n] for n in names[rank::2]) for rank in range(2))
    total = sum(sizes.values())
    result = {
        "bytes": total,
        "files": len(sizes),
        "threads": args.threads,
        "cache": "hot" if args.hot else "cold",
        "seconds": seconds,
        "verify_s": min(seconds["verify"]),
        "one_thread_s": min(seconds["one_thread"]),
        "speedup": median_ratio(seconds["one_thread"], seconds["verify"]),
        "gb_per_s": total / 1e9 / min(seconds["verify"]),
        "critical_bytes_at_2_ranks": {"by_bytes_over_threads": by_bytes, "by_file_count_one_thread": by_count},
        "console": reports[-1].describe(folder),
    }
    print(json.dumps(result))
    print(
        f"{total / 1e9:.2f} GB in {len(sizes)} files ({result['cache']} cache): verify {result['verify_s']:.2f} s "
        f"({result['gb_per_s']:.2f} GB/s, {args.threads} thread(s)), one thread in turn "
        f"{result['one_thread_s']:.2f} s: x{result['speedup']:.2f}; at 2 ranks one worker hashes at most "
        f"{by_bytes / 1e9:.2f} GB split by bytes over threads, {by_count / 1e9:.2f} GB split by file count"
    )
    print(f"console: {result['console']}")


if __name__ == "__main__":
    main()
