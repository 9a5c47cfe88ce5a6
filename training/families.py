"""The family registry: what each training run is, declared once.

A family is what one training run exports, sharing one version (`codec` -> `encoder` +
`decoder`). Everything that trains, evaluates, documents or tests the models enumerates
this registry: `python -m training`, `make train`, `make train-smoke`, `make evaluate`,
`make publish`, the model card and the tests. Adding a family = a module with `Config` and
`train(cfg, family)` plus one entry here, naming its evaluator (a function of
training.evaluate), its dataset and, for a classifier, its trust settings and bars. Splits
are the training config's (`n_val`, `seed`): the trust step and the evaluation read them from
`Family.config()`, never retype them.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field

# metric -> (comparison, bar, stretch): the quality table, checked on every evaluation
Bars = dict[str, tuple[str, float, float]]


@dataclass(frozen=True)
class Trust:
    """A classifier's trust step (training.ood): what it is fitted and checked on, and its bars."""

    bars: Bars  # reported by make evaluate and by the trust step; loads are gated by `Family.bars` only
    other: str = ""  # image classifiers: the other dataset, the first out-of-distribution set
    pass_rate: float = 0.95  # share of the validation split (wild renderings included) that passes
    # share of the validation split's official images alone that passes at least (the threshold is
    # the larger of the two): wild renderings in the split must not push the official test's false rejects up
    official_pass_rate: float = 0.95
    glyphs: bool = False  # outlier exposure to printed letters and symbols (training.ood_sets.glyph_sets)


@dataclass(frozen=True)
class Family:
    name: str
    module: str  # a training module with `Config` and `train(cfg, family)`
    models: tuple[str, ...]  # the models it exports, in export order
    bars: Bars
    evaluator: str  # the function of training.evaluate that measures it: (model name, ctx) -> metrics
    dataset: str  # what its models learn: a dataset of training.data ("mnist", "fashion", "sst2")
    summary: dict[str, str]  # model -> one line for the model card
    pictures: dict[str, tuple[str, ...]] = field(default_factory=dict)  # model -> docs/img files
    overrides: dict = field(default_factory=dict)  # Config fields that differ from the module's defaults
    note: str = ""  # why the overrides
    trust: Trust | None = None  # classifiers: calibration and out-of-distribution detection (training.trust)

    def config(self, **changes):
        cls = importlib.import_module(self.module).Config
        declared = {"dataset": self.dataset} if "dataset" in {f.name for f in dataclasses.fields(cls)} else {}
        return dataclasses.replace(cls(**declared, **self.overrides), **changes)

    @property
    def trust_bars(self) -> Bars:
        return self.trust.bars if self.trust else {}

    def train(self, cfg) -> dict:
        return importlib.import_module(self.module).train(cfg, self.name)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            "digits",
            "training.classifier",
            ("digits",),
            bars={"test_accuracy": (">=", 0.993, 0.995)},
            evaluator="eval_classifier",
            dataset="mnist",
            summary={"digits": "CNN (3 conv blocks, BatchNorm, dropout) on MNIST; random ±2 px shifts."},
            pictures={"digits": ("digits_confusion.png", "digits_curves.png", "digits_reliability.png")},
            overrides={"label_smoothing": 0.0, "augment": True, "wild": 12000},
            trust=Trust(
                bars={
                    "auroc_fashion_mnist_test": (">=", 0.99, 0.99),
                    "auroc_uniform_noise": (">=", 0.99, 0.99),
                    "auroc_blank": (">=", 0.99, 0.99),
                    "auroc_constant": (">=", 0.99, 0.99),
                    "false_reject_rate_test": ("<=", 0.05, 0.05),
                    "ece_test": ("<=", 0.01, 0.01),
                    "wild_letters_symbols_flagged": (">=", 0.90, 0.95),
                    "glyphs_held_out_flagged": (">=", 0.90, 0.95),
                },
                other="fashion",
                glyphs=True,
            ),
            note="digits is also the generator's judge: label smoothing would cap its confidence (and so the "
            "Inception-style score) near 7.9 even on real digits",
        ),
        Family(
            "fashion",
            "training.classifier",
            ("fashion",),
            bars={"test_accuracy": (">=", 0.920, 0.935)},
            evaluator="eval_classifier",
            dataset="fashion",
            summary={"fashion": "The same CNN on Fashion-MNIST; shifts and horizontal flips."},
            pictures={"fashion": ("fashion_confusion.png", "fashion_curves.png", "fashion_reliability.png")},
            overrides={"hflip": True, "epochs": 20, "width": 32},
            trust=Trust(
                bars={
                    "auroc_mnist_test": (">=", 0.97, 0.99),
                    "auroc_uniform_noise": (">=", 0.99, 0.99),
                    "false_reject_rate_test": ("<=", 0.05, 0.05),
                    "ece_test": ("<=", 0.015, 0.015),
                },
                other="mnist",
                official_pass_rate=0.96,
            ),
        ),
        Family(
            "sentiment",
            "training.sentiment",
            ("sentiment",),
            bars={"dev_accuracy": (">=", 0.830, 0.850)},
            evaluator="eval_sentiment",
            dataset="sst2",
            summary={"sentiment": "BiLSTM from scratch on GLUE SST-2 (no pretrained embeddings); max+mean pooling."},
            pictures={"sentiment": ("sentiment_curves.png", "sentiment_reliability.png")},
            trust=Trust(bars={"ece_dev": ("<=", 0.04, 0.04)}),
        ),
        Family(
            "generator",
            "training.generator",
            ("generator",),
            bars={"requested_digit_accuracy": (">=", 0.95, 0.97), "inception_score": (">=", 9.0, 9.4)},
            evaluator="eval_generator",
            dataset="mnist",
            summary={"generator": "Class-conditional DCGAN (projection discriminator + auxiliary digit classifier)."},
            pictures={"generator": ("generator_samples.png", "generator_curves.png")},
        ),
        Family(
            "codec",
            "training.codec",
            ("encoder", "decoder"),
            bars={"bytes_per_image": ("<=", 16, 16), "psnr_db": (">=", 21.0, 23.5)},
            evaluator="eval_codec",
            dataset="mnist",
            summary={
                "encoder": "Convolutional autoencoder; 32 sigmoid latents quantized to 4 bits = 16 bytes.",
                "decoder": "Decoder half of the codec: 16-byte code -> 28×28 image.",
            },
            pictures={"encoder": ("codec_rate_distortion.png", "codec_pairs.png", "codec_curves.png")},
        ),
        Family(
            "denoiser",
            "training.denoiser",
            ("denoiser",),
            bars={"psnr_db_sigma_0.3": (">=", 22.5, 24.0), "psnr_db_sigma_0.5": (">=", 18.5, 20.5)},
            evaluator="eval_denoiser",
            dataset="mnist",
            summary={"denoiser": "Small residual U-Net (28 -> 14 -> 7) trained with σ ~ U(0.1, 0.6)."},
            pictures={"denoiser": ("denoiser_baselines.png", "denoiser_triplets.png", "denoiser_curves.png")},
        ),
    ]
}


def check_bars(family: Family, metrics: dict, bars: Bars | None = None) -> list[tuple[str, bool, bool]]:
    """[(line, meets bar, meets stretch)] like `digits test_accuracy 0.9951 >= 0.993 ok (stretch 0.995 met)`."""
    out = []
    for key, (op, bar, stretch) in (family.bars if bars is None else bars).items():
        if key not in metrics:
            continue
        v = metrics[key]
        ok = v >= bar if op == ">=" else v <= bar
        st = v >= stretch if op == ">=" else v <= stretch
        out.append(
            (
                f"{family.name} {key} {v:.4f} {op} {bar} {'ok' if ok else 'BELOW BAR'}"
                f" (stretch {stretch} {'met' if st else 'not met'})",
                ok,
                st,
            )
        )
    return out


_NOT_IN_COMMAND = {"dry_run", "data_dir", "download", "out", "vocab_size"}  # vocab_size is derived


def command_for(family: str, cfg) -> str:
    """The shortest command line that reproduces cfg: only flags that differ from defaults."""
    base = FAMILIES[family].config()
    parts = ["python -m training", family]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in _NOT_IN_COMMAND or value == getattr(base, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        parts.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {value}")
    return " ".join(parts)
