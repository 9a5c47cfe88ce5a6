"""`make publish FAMILY=<family> [EPOCHS=<n>]`: a new, inactive version of one family.

Trains the family, exports it as a new version into the model directory (not active),
evaluates that version against the family's quality bars (its metrics, `meets_bars` and
smoke set go into its metadata) and prints the admin call that loads it into a running
service. A candidate below its bars is still written, marked `meets_bars: false`: the
admin API refuses it unless asked with `"allow_below_bars": true` (so a quick EPOCHS=1
candidate can rehearse a swap).

    python -m training.publish digits --epochs 1 [--exported DIR] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from training import common, evaluate
from training.data import DataError, resolve_data_dir
from training.export import export_family
from training.families import FAMILIES
from training.trust import finisher


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.publish", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("family", choices=list(FAMILIES))
    p.add_argument("--epochs", type=int, default=None, help="override the family's epochs (a quick candidate)")
    p.add_argument("--exported", default=str(common.EXPORTED), help="the model directory the version goes to")
    p.add_argument("--data-dir", default="", help="dataset directory (see training.data)")
    args = p.parse_args(argv)
    family = FAMILIES[args.family]
    changes = {"out": args.exported, "data_dir": args.data_dir}
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    cfg = family.config(**changes)
    start = time.perf_counter()
    print(f"publish {family.name}: training ({cfg.epochs} epochs)", flush=True)
    try:
        trained = family.train(cfg)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    exported = Path(args.exported)
    finish = None
    if family.trust:
        finish = finisher(resolve_data_dir(args.data_dir))
    version = export_family(family.name, trained.parts, exported, trained.training, activate=False, finish=finish)
    common.plot_curves(
        trained.history,
        common.RUNS / "publish" / f"{family.name}-{version}_curves.png",
        f"{family.name} {version}: training",
    )
    print(f"publish {family.name}: evaluating version {version} against its bars", flush=True)
    evaluate.main(
        [
            "--exported",
            str(exported),
            "--only",
            family.name,
            "--version",
            version,
            *(["--data-dir", args.data_dir] if args.data_dir else []),
        ]
    )
    meta = json.loads((exported / family.name / version / f"{family.models[0]}.json").read_text())
    ok = meta.get("meets_bars", False)
    body = {"version": version} if ok else {"version": version, "allow_below_bars": True}
    print(
        f"\npublished {family.name} {version} in {time.perf_counter() - start:.0f} s: "
        f"{'meets its quality bars' if ok else 'BELOW its quality bars (marked meets_bars: false)'}\n"
        "load it into a running deepserve (DEEPSERVE_ADMIN_KEY set there) with:\n"
        f"  curl -X POST -H \"Authorization: Bearer $DEEPSERVE_ADMIN_KEY\" -H 'Content-Type: application/json' \\\n"
        f"    -d '{json.dumps(body)}' http://localhost:3000/admin/models/{family.name}/load\n"
        f"and back with:\n"
        f'  curl -X POST -H "Authorization: Bearer $DEEPSERVE_ADMIN_KEY" http://localhost:3000/admin/models/{family.name}/rollback',
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
