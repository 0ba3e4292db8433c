"""``python -m sixbit_tune.store {info,verify,migrate,compact} STORE``: inspect, check, migrate or compact a store."""

from __future__ import annotations

import argparse
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sixbit_tune.store", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("info", help="schema version and row counts per table")
    p.add_argument("store")
    p = sub.add_parser(
        "verify",
        help="check every part (its SHA-256, or a full decode for parts without one); damaged parts are moved to "
        "quarantine/ when the folder is writable; exit 1 if any was found",
    )
    p.add_argument("store")
    p = sub.add_parser("migrate", help="migrate a store in place to this sixbit-tune's schema version")
    p.add_argument("store")
    p = sub.add_parser("compact", help="merge the many small part files of runs/trials/predictors/policies")
    p.add_argument("store")
    args = parser.parse_args(argv)

    from sixbit_tune.store import SCHEMA_VERSION, TABLES, Store, StoreError, migrate
    from sixbit_tune.store.migrations import read_version
    from sixbit_tune.store.store import QUARANTINE

    try:
        if args.cmd == "migrate":
            steps = migrate(args.store)
            for s in steps:
                print(f"migrated {s}")
            print(f"{args.store}: schema version {SCHEMA_VERSION}" + ("" if steps else " (already current)"))
            return 0
        if args.cmd == "compact":
            with Store.open(args.store) as store:
                merged = store.compact()
            for name, n in merged.items():
                print(f"  {name:12s} {n:>8,d} parts merged into 1")
            print(f"{args.store}: compacted" if merged else f"{args.store}: nothing to compact")
            return 0
        if args.cmd == "verify":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # each damaged part is printed below
                with Store.open(args.store, read_only=True) as store:
                    damaged = store.damaged_parts()
            for d in damaged:
                where = f"moved to {d.moved_to}" if d.moved_to else "left in place (folder not writable)"
                print(f"  damaged {d.path}: {d.reason} ({where})")
            print(f"{args.store}: {len(damaged)} damaged parts" if damaged else f"{args.store}: every part is whole")
            earlier = [p for p in (store.path / QUARANTINE).glob("*/*") if not p.name.endswith(".why.txt")]
            if len(earlier) > len([d for d in damaged if d.moved_to]):
                print(f"  {len(earlier)} parts in total are set aside in {store.path / QUARANTINE} (see their .why.txt)")
            return 1 if damaged else 0
        print(f"{args.store}: schema version {read_version(args.store)} (this sixbit-tune reads {SCHEMA_VERSION})")
        with Store.open(args.store, read_only=True) as store:
            for name in TABLES:
                n = store.to_arrow(f'SELECT count(*) FROM "{name}"').column(0)[0].as_py()
                print(f"  {name:16s} {n:>12,d} rows")
        return 0
    except (FileNotFoundError, StoreError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
