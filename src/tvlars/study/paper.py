"""The paper's published Table 1, as data (docs/paper.md section 3; accuracy in percent).

``TABLE1[(dataset, task)][optimizer][batch_size]`` is the tuple of accuracies for the
three learning rates ``LEARNING_RATES[batch_size]`` (the paper's "lr a/b/c").
``task`` is the harness command: ``"train"`` (the paper's CLF column) or ``"ssl"``
(Barlow Twins, linear-probe accuracy). The table does not say whether its LARS and LAMB
rows used warm-up; the report shows them beside both variants.
"""

from __future__ import annotations

BATCH_SIZES = (512, 1024, 2048, 4096, 8192, 16384)

LEARNING_RATES = {
    512: (1.0, 2.0, 3.0),
    1024: (2.0, 3.0, 4.0),
    2048: (5.0, 6.0, 7.0),
    4096: (8.0, 9.0, 10.0),
    8192: (10.0, 12.0, 15.0),
    16384: (15.0, 17.0, 19.0),
}

#: the decay coefficient lam the paper used for each task in Table 1
LAM = {"train": 1e-4, "ssl": 1e-5}

#: lam values of the ablation (Section 5.2.1, Figures 3 and 4)
ABLATION_LAMS = (1e-2, 5e-3, 1e-3, 1e-4, 1e-5, 1e-6)

# Rows as printed in docs/paper.md: per batch size, per optimizer, four groups of three
# (CIFAR-10 CLF | Tiny ImageNet CLF | CIFAR-10 BT | Tiny ImageNet BT).
_RAW = {
    512: {
        "lars": "74.64 77.49 79.64 33.72 36.60 38.92 51.31 58.89 60.76 18.32 19.52 21.12",
        "lamb": "57.88 64.76 78.39 20.28 41.40 37.52 10.01 12.01 67.31 13.46 17.75 27.37",
        "tvlars": "78.92 81.42 81.56 37.56 39.28 39.64 69.96 69.72 70.54 29.02 31.01 31.44",
    },
    1024: {
        "lars": "74.70 78.83 80.52 33.80 36.84 38.52 61.13 67.03 68.98 19.96 19.36 20.38",
        "lamb": "52.06 57.83 79.98 16.88 31.84 37.76 12.03 15.03 69.49 16.44 16.70 24.53",
        "tvlars": "81.84 82.58 82.54 39.60 39.16 39.40 67.38 69.80 71.13 28.98 27.46 28.32",
    },
    2048: {
        "lars": "75.22 79.49 81.10 34.48 38.04 40.44 52.42 57.35 52.42 19.92 20.33 19.98",
        "lamb": "43.12 47.88 81.43 12.60 18.56 39.92 10.01 15.64 60.08 18.67 21.98 23.43",
        "tvlars": "81.52 82.22 82.44 39.56 39.56 41.68 62.61 61.71 61.05 26.15 23.43 27.08",
    },
    4096: {
        "lars": "75.63 80.96 82.49 34.24 38.56 40.40 52.77 55.74 55.98 19.45 20.20 20.25",
        "lamb": "22.32 37.52 81.53 05.24 10.76 39.00 48.93 50.19 53.38 13.78 15.66 21.45",
        "tvlars": "80.90 80.96 81.16 38.28 39.96 41.64 57.96 58.28 60.46 24.29 24.29 24.92",
    },
    8192: {
        "lars": "77.59 81.75 82.50 34.36 38.12 42.00 50.29 52.78 09.65 19.69 20.79 21.62",
        "lamb": "16.14 19.85 81.78 01.12 02.48 39.20 42.22 45.26 52.39 19.60 23.44 23.55",
        "tvlars": "81.16 82.42 82.74 36.48 39.20 42.32 54.14 53.56 52.24 23.41 23.47 24.26",
    },
    16384: {
        "lars": "79.46 80.62 38.57 35.60 39.72 41.72 48.27 48.26 49.05 20.97 21.54 22.42",
        "lamb": "14.82 11.97 77.16 00.84 00.92 37.28 42.26 44.02 49.65 20.34 23.58 23.78",
        "tvlars": "79.20 80.42 80.42 38.56 40.32 41.08 48.16 49.84 50.15 25.82 24.95 25.91",
    },
}

_COLUMNS = (("cifar10", "train"), ("tinyimagenet", "train"), ("cifar10", "ssl"), ("tinyimagenet", "ssl"))


def _build() -> dict[tuple[str, str], dict[str, dict[int, tuple[float, float, float]]]]:
    table: dict = {key: {} for key in _COLUMNS}
    for batch, rows in _RAW.items():
        for optimizer, text in rows.items():
            values = [float(v) for v in text.split()]
            for i, key in enumerate(_COLUMNS):
                table[key].setdefault(optimizer, {})[batch] = tuple(values[3 * i : 3 * i + 3])
    return table


TABLE1 = _build()

#: dataset/task names as the paper prints them
TITLES = {
    ("cifar10", "train"): "CIFAR-10 classification (ResNet-18)",
    ("tinyimagenet", "train"): "Tiny ImageNet classification (ResNet-34)",
    ("cifar10", "ssl"): "CIFAR-10 Barlow Twins (linear probe)",
    ("tinyimagenet", "ssl"): "Tiny ImageNet Barlow Twins (linear probe)",
}


def published(dataset: str, task: str, optimizer: str, batch_size: int, lr: float) -> float | None:
    """Table 1's accuracy for this setting, or None when the paper has no such cell."""
    rows = TABLE1.get((str(dataset).lower(), task), {}).get(str(optimizer).lower(), {})
    values = rows.get(int(batch_size))
    lrs = LEARNING_RATES.get(int(batch_size))
    if values is None or lrs is None:
        return None
    for candidate, value in zip(lrs, values):
        if abs(candidate - float(lr)) < 1e-9:
            return value
    return None
