"""Benchmark `python -m hanorec.data prepare` on an ML-1M-sized synthetic data set.

Generates 1,000,000 interactions of 6,000 users over 3,700 items (Zipf-like item
popularity, random timestamps with many ties) in the plain-table format, then prepares all
four protocols with pairs and prints a table of stage timings. Target: < 60 s on 2 cores.

    python benchmarks/data_prepare.py [--interactions 1000000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from hanorec.data.config import DataConfig
from hanorec.data.prepare import prepare


def make_dataset(folder: Path, interactions: int, users: int, items: int, seed: int = 0) -> None:
    """Write ``interactions.csv`` and ``items.csv`` (plain-table format) into `folder`."""
    rng = np.random.default_rng(seed)
    user = rng.integers(0, users, interactions)
    weights = 1.0 / np.arange(1, items + 1) ** 0.8
    item = rng.choice(items, size=interactions, p=weights / weights.sum())
    timestamp = 9.5e8 + rng.integers(0, 10**6, interactions) * 30
    pacsv.write_csv(pa.table({"user_id": pa.array(user.astype(str)),
                              "item_id": pa.array(item.astype(str)),
                              "rating": rng.integers(1, 6, interactions),
                              "timestamp": timestamp}), folder / "interactions.csv")
    pacsv.write_csv(pa.table({"item_id": pa.array(np.arange(items).astype(str)),
                              "title": [f"Synthetic item {i} ({1950 + i % 70})"
                                        for i in range(items)],
                              "genres": ["Drama|Comedy" if i % 2 else "Action"
                                         for i in range(items)]}), folder / "items.csv")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--interactions", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=6_000)
    parser.add_argument("--items", type=int, default=3_700)
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        make_dataset(folder, args.interactions, args.users, args.items)
        print(f"generated {args.interactions:,} interactions in "
              f"{time.perf_counter() - start:.1f} s (not timed below)")
        config = DataConfig(dataset_format="table",
                            interactions_path=str(folder / "interactions.csv"),
                            items_path=str(folder / "items.csv"), rating_column="rating",
                            genres_column="genres", output_dir=str(folder / "prepared"))
        timings: dict[str, float] = {}
        start = time.perf_counter()
        manifest = prepare(config, timings=timings, progress=False)
        total = time.perf_counter() - start
    print(f"\n{manifest['users']} users, {manifest['items']} items, "
          f"{manifest['interactions']:,} interactions; train rows per protocol: "
          f"{manifest['counts']['full']['train']:,}")
    print(f"\n{'stage':<22}{'seconds':>9}")
    for stage, seconds in timings.items():
        print(f"{stage:<22}{seconds:>9.2f}")
    print(f"{'total':<22}{total:>9.2f}")


if __name__ == "__main__":
    main()
