"""Trust settings for the classifiers, as one step of their export (when not to trust
an answer): calibrated confidence and an out-of-distribution signal, fitted on the
validation split (training.ood has the method and the numbers).

Every export of a family with trust (training.families: `trust=True`) runs `finish` on the
staged files before they are hashed, so `make train` and `make publish` produce complete
models. `python -m training.trust <family>` applies it to the active version of a model
directory that predates it, as a new version of the family (made active, the old one kept
as the previous).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from training import common, data
from training.families import FAMILIES


def finisher(data_dir: Path, limit: int | None = None):
    """The `finish` hook of training.export.export_family for a family with trust (`limit`:
    a dry run fits on a slice of each set)."""

    def finish(staging: Path, metas: dict[str, dict]) -> None:
        from training.ood import attach

        for name, meta in metas.items():
            evaluation = attach(name, staging, meta, data_dir, limit)
            bars = evaluation.get("bars", {})
            print(
                f"{name}: trust bars " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in bars.items()),
                flush=True,
            )

    return finish


def main(argv: list[str] | None = None) -> int:
    from training.export import commit_version

    p = argparse.ArgumentParser(
        prog="python -m training.trust", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("family", choices=[f for f, fam in FAMILIES.items() if fam.trust])
    p.add_argument("--exported", default=str(common.EXPORTED))
    p.add_argument("--data-dir", default="")
    args = p.parse_args(argv)
    exported, family = Path(args.exported), FAMILIES[args.family]
    from service import repository

    source = repository.read(exported).families[family.name].active
    staging = exported / family.name / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(exported / family.name / source, staging, ignore=shutil.ignore_patterns("*.smoke.npz"))
    metas = {}
    for name in family.models:
        meta = json.loads((staging / f"{name}.json").read_text())
        for key in ("version", "sha256", "size_bytes", "smoke", "calibration", "ood"):
            meta.pop(key, None)
        meta.setdefault("training", {})["trust_from"] = source
        metas[name] = meta
    finisher(data.resolve_data_dir(args.data_dir))(staging, metas)
    version = commit_version(exported, family.name, staging, metas, common.today(), activate=True)
    print(f"VERSION {family.name} {version} (trust added to {source}); run make evaluate", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
