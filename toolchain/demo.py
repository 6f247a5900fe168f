"""`edgeadapt demo`: export the real MobileNetV2 (ImageNet), adapt its head on a small real texture dataset
(scikit-image's brick, grass, gravel and moon-surface photos, cut into patches: training patches from the top of
each photo, held-out patches from the bottom), and report what changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TEXTURES = ("brick", "grass", "gravel", "moon")
PATCH = 64


def write_texture_dataset(root: Path, train_per_class: int = 40, test_per_class: int = 16, seed: int = 0) -> None:
    """Random 64×64 patches: top 60% of each photo → root/train, bottom 40% → root/test (no overlap)."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in TEXTURES:
        image = getattr(skimage.data, name)()
        split_row = int(image.shape[0] * 0.6)
        regions = {"train": (0, split_row - PATCH, train_per_class),
                   "test": (split_row, image.shape[0] - PATCH, test_per_class)}
        for part, (top, bottom, count) in regions.items():
            folder = root / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                y, x = rng.integers(top, bottom + 1), rng.integers(0, image.shape[1] - PATCH + 1)
                Image.fromarray(image[y:y + PATCH, x:x + PATCH]).save(folder / f"{i:03d}.png")


@dataclass
class DemoReport:
    bundle: Path
    export_seconds: float
    accuracy_before: float
    accuracy_after: float
    test_samples: int
    train_summary: object
    deployed: list = field(default_factory=list)
    prediction: object = None


def run_demo(workdir: Path, epochs: int = 3, on_batch=None) -> DemoReport:
    from edgeadapt.runtime.deploy import deploy
    from edgeadapt.runtime.inference import evaluate, predict
    from edgeadapt.runtime.trainer import TrainConfig, Trainer
    from edgeadapt.toolchain.build import HeadRequest
    from edgeadapt.toolchain.export import ExportOptions, export_bundle

    data = workdir / "textures"
    if not (data / "test").is_dir():
        write_texture_dataset(data)
    result = export_bundle(ExportOptions(out=workdir / "bundle", backbone="mobilenet_v2", weights="imagenet",
                                         head=HeadRequest(labels=TEXTURES), force=True))
    before = evaluate(result.out, data / "test").accuracy
    summary = Trainer(result.out, TrainConfig(epochs=epochs, batch_size=32, val_split=0.1),
                      on_batch=on_batch).fit(data / "train")
    after = evaluate(result.out, data / "test")
    deployed = [deploy(result.out, "onnx", workdir / "deployed" / "model.onnx"),
                deploy(result.out, "openvino", workdir / "deployed" / "model.xml")]
    sample = sorted((data / "test" / "gravel").glob("*.png"))[0]
    return DemoReport(result.out, result.seconds, before, after.accuracy, after.n, summary, deployed,
                      predict(result.out, [sample], top_k=2)[0])
