"""Write a synthetic hierarchical feature cohort (`python -m hmil.synthetic_features`).

The cohort itself is drawn by :mod:`hmil.data.synthetic`; this is its command line.
"""

from __future__ import annotations

import argparse
import sys

from hmil.data.hierarchy import Hierarchy, HierarchyError
from hmil.data.synthetic import SyntheticConfig, generate_cohort, write_cohort


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hmil.synthetic_features",
        description="Write a synthetic hierarchical MIL cohort: <slide_id>.h5 files + a table.",
    )
    parser.add_argument("--hierarchy", required=True, help="hierarchy YAML")
    parser.add_argument("--out", required=True, help="features directory to write")
    parser.add_argument("--table", help="slide table CSV (default: OUT/slides.csv)")
    parser.add_argument(
        "--bags-per-class", type=int, default=SyntheticConfig.bags_per_class,
        help="bags (slides) per fine class",
    )  # fmt: skip
    parser.add_argument(
        "--feature-dim", type=int, default=SyntheticConfig.feature_dim, help="feature dimension D"
    )
    parser.add_argument(
        "--seed", type=int, default=SyntheticConfig.seed, help="same seed, same cohort"
    )
    args = parser.parse_args(argv)
    try:
        hierarchy = Hierarchy.from_yaml(args.hierarchy)
        config = SyntheticConfig(
            bags_per_class=args.bags_per_class, feature_dim=args.feature_dim, seed=args.seed
        )
        cohort = generate_cohort(hierarchy, config)
        table_path = write_cohort(cohort, args.out, args.table)
    except (HierarchyError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {len(cohort.features)} synthetic bags to {args.out}, table {table_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
