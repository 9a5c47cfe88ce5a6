"""Trust settings for the classifiers, as one step of their export (when not to trust
an answer): calibrated confidence and an out-of-distribution signal, fitted on the
validation split (training.ood has the method and the numbers).

Every export of a family with trust (training.families: `trust=True`) runs `finish` on the
staged files before they are hashed, so `make train` and `make publish` produce complete
models. `python -m training.trust <family>` refits it on the active version of a model directory
(the earlier fit's nodes are stripped first), as a new version of the family (made active,
the old one kept as the previous); the new metadata records the command as
`training.trust_command` and the source version as `training.trust_from`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from service import repository
from training import common, data
from training.export import commit_version
from training.families import FAMILIES
from training.ood import attach


def finisher(data_dir: Path, limit: int | None = None, heldout_fonts: Path | None = None):
    """The `finish` hook of training.export.export_family for a family with trust (`limit`:
    a dry run fits on a slice of each set)."""

    def finish(staging: Path, metas: dict[str, dict]) -> None:
        for name, meta in metas.items():
            evaluation = attach(name, staging, meta, data_dir, limit, heldout_fonts)
            bars = evaluation.get("bars", {})
            print(
                f"{name}: trust bars " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in bars.items()),
                flush=True,
            )

    return finish


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.trust", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("family", choices=[f for f, fam in FAMILIES.items() if fam.trust])
    p.add_argument("--exported", default=str(common.EXPORTED))
    p.add_argument("--data-dir", default="")
    p.add_argument("--heldout-fonts", type=Path, default=None, help="more held-out fonts for the glyph check")
    args = p.parse_args(argv)
    exported, family = Path(args.exported), FAMILIES[args.family]
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
        meta["training"]["trust_command"] = "python -m training.trust " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        metas[name] = meta
    finisher(data.resolve_data_dir(args.data_dir), heldout_fonts=args.heldout_fonts)(staging, metas)
    version = commit_version(exported, family.name, staging, metas, common.today(), activate=True)
    print(f"VERSION {family.name} {version} (trust added to {source}); run make evaluate", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
