"""`python -m training <family> [flags]`: flags come from the family's Config dataclass."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys

# family -> (module, Config overrides). One module may serve two families (the classifiers).
FAMILIES: dict[str, tuple[str, dict]] = {
    # digits is also the generator's judge: label smoothing would cap its confidence (and so
    # the Inception-style score) near 7.9 even on real digits
    "digits": ("training.classifier", {"dataset": "mnist", "label_smoothing": 0.0}),
    "fashion": ("training.classifier", {"dataset": "fashion", "hflip": True, "epochs": 20, "width": 32}),
    "sentiment": ("training.sentiment", {}),
    "generator": ("training.generator", {}),
    "codec": ("training.codec", {}),
    "denoiser": ("training.denoiser", {}),
}
_NOT_IN_COMMAND = {"dry_run", "data_dir", "download", "out", "vocab_size"}  # vocab_size is derived
_HELP = {
    "dry_run": "one batch per step, one epoch, scratch output dir (a smoke test)",
    "data_dir": "dataset folder; empty: $DEEPSERVE_DATA_DIR, else ~/.cache/deepserve/datasets",
    "download": "fetch missing canonical dataset files (verified by sha256)",
    "out": "where the ONNX files go; empty: exported/ (runs/dry-run with --dry-run)",
}


def default_config(family: str):
    module = importlib.import_module(FAMILIES[family][0])
    return module.Config(**FAMILIES[family][1])


def command_for(family: str, cfg) -> str:
    """The shortest command line that reproduces cfg: only flags that differ from defaults."""
    base = default_config(family)
    parts = ["python -m training", family]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in _NOT_IN_COMMAND or value == getattr(base, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        parts.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {value}")
    return " ".join(parts)


def parse(argv: list[str]):
    """Pick the family from the first argument, then parse that family's Config flags."""
    top = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    top.add_argument("family", choices=list(FAMILIES))
    known, rest = top.parse_known_args(argv[:1])
    family = known.family
    cfg = default_config(family)
    p = argparse.ArgumentParser(prog=f"python -m training {family}",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(cfg):
        flag, default = "--" + f.name.replace("_", "-"), getattr(cfg, f.name)
        help_ = _HELP.get(f.name, f.name.replace("_", " "))
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
        else:
            p.add_argument(flag, type=type(default), default=default, help=help_)
    values = vars(p.parse_args(rest + argv[1:]))
    return family, dataclasses.replace(cfg, **values)


def main(argv: list[str] | None = None) -> int:
    from training.data import DataError

    family, cfg = parse(sys.argv[1:] if argv is None else argv)
    module = importlib.import_module(FAMILIES[family][0])
    try:
        module.train(cfg, family)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
