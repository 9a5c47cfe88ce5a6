"""`python -m training <family> [flags]`: flags come from the family's Config dataclass.

python -m training --list                 the families (training.families)
python -m training digits --epochs 2      train, export a new version, make it active
python -m training digits --inactive      ... but leave the active version alone (make publish)
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from training import common
from training.data import DataError, resolve_data_dir
from training.export import export_family
from training.families import FAMILIES
from training.trust import finisher

_HELP = {
    "dry_run": "one batch per step, one epoch, scratch output dir (a smoke test)",
    "data_dir": "dataset folder; empty: $DEEPSERVE_DATA_DIR, else ~/.cache/deepserve/datasets",
    "download": "fetch missing canonical dataset files (verified by sha256)",
    "out": "model directory the new version goes to; empty: exported/ (runs/dry-run with --dry-run)",
}


def parse(argv: list[str]):
    """Pick the family from the first argument, then parse that family's Config flags."""
    if argv[:1] == ["--list"]:
        print(" ".join(FAMILIES))
        raise SystemExit(0)
    top = argparse.ArgumentParser(
        prog="python -m training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    top.add_argument("family", choices=list(FAMILIES))
    known, _ = top.parse_known_args(argv[:1])
    family = FAMILIES[known.family]
    cfg = family.config()
    p = argparse.ArgumentParser(
        prog=f"python -m training {family.name}", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for f in dataclasses.fields(cfg):
        flag, default = "--" + f.name.replace("_", "-"), getattr(cfg, f.name)
        help_ = _HELP.get(f.name, f.name.replace("_", " "))
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            p.add_argument(flag, type=type(default), default=default, help=help_)
    p.add_argument(
        "--inactive",
        action="store_true",
        help="export the new version without making it active (make publish; load it with the admin API)",
    )
    values = vars(p.parse_args(argv[1:]))
    inactive = values.pop("inactive")
    return family, dataclasses.replace(cfg, **values), inactive


def main(argv: list[str] | None = None) -> int:
    family, cfg, inactive = parse(sys.argv[1:] if argv is None else argv)
    try:
        trained = family.train(cfg)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out_dir, img_dir = common.out_dirs(cfg)
    finish = None
    if family.trust:  # calibration and out-of-distribution detection, fitted on the validation split
        finish = finisher(resolve_data_dir(cfg.data_dir), limit=500 if cfg.dry_run else None)
    version = export_family(family.name, trained.parts, out_dir, trained.training, activate=not inactive, finish=finish)
    common.plot_curves(trained.history, img_dir / f"{family.name}_curves.png", f"{family.name}: training")
    print(f"VERSION {family.name} {version}", flush=True)
    return 0
