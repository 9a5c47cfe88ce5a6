"""Out-of-distribution scores and calibrated confidence for the classifiers.

Image classifiers (`digits`, `fashion`) get an `ood_score` output computed by the ONNX graph
itself, so the service reads it from the same run as `logits` (the batch thread, no numpy work
on the event loop). `logits` are left untouched: the generator's judge sees the same numbers.

The score (method "multi-layer Mahalanobis"): three feature vectors are read from the
classifier, each scored by its class-conditional Mahalanobis distance (Lee et al., 2018:
class means and one shared covariance, fitted on the training split, i.e. the 55,000 training
images minus the 5,000-image validation split), and the three distances are summed after
dividing each by its standard deviation on the validation split:

    pool1_quadrant_std  per-channel spatial standard deviation of block 1's output within each
                        quadrant: the stroke/texture statistics of the image (thin pen
                        strokes vs cloth, blank pages, noise) and where they are; the best
                        single signal for MNIST vs Fashion-MNIST
    pool1_std           the same over the whole map
    penultimate         the 256-d activation before the final Linear (the classic feature)

    ood_score = sum_f min_c ||W_f (x_f - mu_{f,c})||^2 / scale_f   (higher = less typical)

For `digits` one more term (outlier exposure, training.ood_sets): printed letters and symbols
fool every Mahalanobis feature (a printed "l" or "&" lands among the digits), so a logistic
regression on the same feature vector, fitted to tell glyphs of some fonts and characters from
the training split, adds alpha * softplus(features @ w + b); it is checked on glyphs of other
fonts and characters, never fitted on the wild suite's renderings (training.wild_eval).

The threshold is the smallest validation score such that >= 95% of the validation images pass
(in_distribution = ood_score <= threshold), raised if needed so that a share of the split's
official images alone pass too (training.families: `Trust.official_pass_rate`). The temperature is fitted by minimising the NLL of
the validation logits; for a model trained with label smoothing eps the smoothing is first
inverted (q = max((softmax(z) - eps/K) / (1 - eps), 1e-6)), because a smoothed model's softmax
estimates the smoothed targets, which one temperature cannot map onto accuracies (see
`service.ood.calibrated_probabilities`). Text (`sentiment`): the unknown-token rate per text
and its 95th percentile on SST-2's validation split, plus a temperature.

    python -m training.ood {digits,fashion,sentiment} --out DIR [--exported DIR] [--data-dir DIR]
        [--heldout-fonts DIR]

writes DIR/<name>.onnx (image models), DIR/<name>.ood.json (the metadata blocks plus an
`evaluation` block for the model card) and DIR/<name>_reliability.png. The parts, by concern:
training.ood_metrics (AUROC, thresholds, ECE, temperature), training.ood_graph (features,
detector fits, ONNX surgery), training.ood_sets (noise, blank pages, the other dataset,
glyphs), training.ood_image / training.ood_text (the two pipelines); this module is the
export step (`attach`) and the CLI. A refit starts from the classifier as trained: the trust
nodes of an earlier fit are stripped first.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from service import repository
from training import data
from training.families import FAMILIES
from training.ood_image import build_image
from training.ood_text import build_sentiment


def resolve_model(exported: Path, name: str) -> tuple[Path, Path]:
    """(onnx path, metadata path) of the active version of `name` in a model directory."""
    manifest = repository.read(exported)
    entry = manifest.models[name]
    files = entry.versions[manifest.families[entry.family].active]
    return exported / files.file, exported / files.metadata


def attach(
    name: str, staging: Path, meta: dict, data_dir: Path, limit: int | None = None, heldout_fonts: Path | None = None
) -> dict:
    """Give a staged classifier its trust settings, in place, before it is hashed and
    versioned (training.export.export_family): image models get the `ood_score` output in
    their graph; every classifier gets `calibration` and `ood` blocks in its metadata.
    Returns the evaluation block (for the log)."""
    onnx_path, scratch = staging / f"{name}.onnx", staging / ".trust"
    scratch.mkdir(exist_ok=True)
    try:
        if meta["task"] == "text-classification":
            block = build_sentiment(onnx_path, meta, data_dir, scratch)
        else:
            block = build_image(
                name, onnx_path, meta, data_dir, scratch, timing_runs=1, limit=limit, heldout_fonts=heldout_fonts
            )
            Path(block["file"]["path"]).replace(onnx_path)
            meta["outputs"] = block["outputs"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # make evaluate draws the card's diagrams from the exported files
    meta["calibration"], meta["ood"] = block["calibration"], block["ood"]
    return block["evaluation"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.ood", description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=[f for f, fam in FAMILIES.items() if fam.trust])
    ap.add_argument("--out", required=True, type=Path, help="scratch directory for the new files")
    ap.add_argument("--exported", type=Path, default=Path("exported"), help="model directory to read")
    ap.add_argument("--data-dir", default="", help="datasets (else $DEEPSERVE_DATA_DIR)")
    ap.add_argument("--pass-rate", type=float, default=None, help="default: the family's (training.families)")
    ap.add_argument(
        "--calibration",
        choices=["auto", "temperature"],
        default="auto",
        help="auto: invert the training's label smoothing before the temperature",
    )
    ap.add_argument("--timing-runs", type=int, default=300)
    ap.add_argument("--heldout-fonts", type=Path, default=None, help="more held-out fonts for the glyph check")
    args = ap.parse_args(argv)
    data_dir = data.resolve_data_dir(args.data_dir)
    args.out.mkdir(parents=True, exist_ok=True)
    onnx_path, meta_path = resolve_model(args.exported, args.model)
    meta = json.loads(meta_path.read_text())
    if meta["task"] == "text-classification":
        block = build_sentiment(onnx_path, meta, data_dir, args.out, args.pass_rate)
    else:
        block = build_image(
            args.model,
            onnx_path,
            meta,
            data_dir,
            args.out,
            args.pass_rate,
            args.calibration,
            args.timing_runs,
            heldout_fonts=args.heldout_fonts,
        )
    block["evaluation"]["command"] = "python -m training.ood " + " ".join(argv if argv is not None else sys.argv[1:])
    path = args.out / f"{args.model}.ood.json"
    path.write_text(json.dumps(block, indent=2) + "\n")
    failed = [k for k, ok in block["evaluation"]["bars"].items() if not ok]
    print(f"wrote {path}" + (f"; BARS MISSED: {', '.join(failed)}" if failed else "; every bar met"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
