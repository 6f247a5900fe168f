"""Shared fixtures: tiny bundles exported once per session, real data, and a way to run code with torch blocked."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgeadapt.toolchain.build import HeadRequest
from edgeadapt.toolchain.export import ExportOptions, export_bundle

DIGIT_LABELS = tuple(str(i) for i in range(10))
# This suite's device key (what the trainer authenticates its state with), not the user's ~/.config one; the CLI
# subprocesses inherit it.
os.environ["EDGEADAPT_DEVICE_KEY"] = str(Path(tempfile.mkdtemp(prefix="edgeadapt-tests-")) / "device.key")


def pytest_runtest_setup(item):
    """`@pytest.mark.ort_training` tests need the optional plugin: skipped, with the reason, on a host without it;
    failed where the run says the plugin must be there (CI's plugin host)."""
    if item.get_closest_marker("ort_training") is None:
        return
    from edgeadapt.toolchain.ort_training import unavailable

    missing = unavailable()
    if missing and os.environ.get("EDGEADAPT_REQUIRE_ORT_TRAINING") == "1":
        pytest.fail(f"EDGEADAPT_REQUIRE_ORT_TRAINING=1 but {missing}")
    if missing:
        pytest.skip(f"needs the [ort-training] plugin: {missing}")


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the offline datasets' readers


def wordnet_csv(path: Path, labels: tuple[str, ...], per_class: int, offset: int = 0) -> Path:
    """Real text: WordNet noun glosses, one lexicographer category per label (`offset` picks later glosses)."""
    from datasets import wordnet_glosses, write_text_csv

    categories = {number: label for number, label in zip(range(4, 29), labels)}
    glosses = wordnet_glosses(categories)
    return write_text_csv(path, [(glosses[label][offset + i], label) for label in labels for i in range(per_class)])


def spoken_folder(root: Path, words: tuple[str, ...], voices: tuple[str, ...] = ("en-gb+m1", "en-us+f2"),
                  labels: tuple[str, ...] | None = None) -> Path:
    """Real speech: each word said by each voice at two speeds (espeak-ng), in class folders named by `labels`."""
    from datasets import speak

    for word, label in zip(words, labels or words):
        for voice in voices:
            for speed in (140, 180):
                speak(word, voice, speed, 50, root / label / f"{voice.replace('+', '_')}-{speed}.wav")
    return root


def calibration_for(kind: str, root: Path, labels: tuple[str, ...], images: Path) -> Path:
    """Labelled samples of an input kind: `images` (an .npz) for images and rows, else real text or speech."""
    if kind == "tokens":
        return wordnet_csv(root / "texts.csv", labels, 8)
    if kind == "audio":
        words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven")
        return spoken_folder(root / "speech", words[:len(labels)], labels=labels)
    return images


def torch_input(x: np.ndarray, dtype=None):
    """A batch for a torch model: float inputs in `dtype` (when given), token ids as they are."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(x))
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory):
    """export(backbone, preset, **options) -> bundle path; each distinct export runs once per session."""
    made: dict = {}

    def export(backbone: str = "tiny_cnn", preset: str = "head", **kwargs) -> Path:
        key = (backbone, preset, tuple(sorted(kwargs.items())))
        if key not in made:
            out = tmp_path_factory.mktemp("bundles") / f"{backbone}-{preset.replace(':', '')}"
            head = kwargs.pop("head", HeadRequest(labels=DIGIT_LABELS))
            made[key] = export_bundle(ExportOptions(out=out, backbone=backbone, head=head, trainable=preset,
                                                    **kwargs)).out
        return made[key]

    return export


@pytest.fixture
def fresh_bundle(bundle_factory, tmp_path):
    """A private copy of a session bundle, for tests that train or damage it."""
    import shutil

    def copy(backbone: str = "tiny_mlp", preset: str = "full", **kwargs) -> Path:
        target = tmp_path / "bundle"
        shutil.copytree(bundle_factory(backbone, preset, **kwargs), target)
        return target

    return copy


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> dict[str, Path]:
    """scikit-learn's 8×8 digits as .npz (rows for tiny_mlp) and CSV, split into train and test."""
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    data = load_digits()
    x, y = (data.data / 16.0).astype(np.float32), data.target
    paths = {}
    for name, part in (("train", slice(0, 1200)), ("test", slice(1200, None))):
        paths[name] = root / f"{name}.npz"
        np.savez(paths[name], x=x[part], y=y[part].astype(str))
    paths["csv"] = root / "train.csv"
    rows = ["," .join(f"p{i}" for i in range(64)) + ",label"]
    rows += [",".join(f"{v:.4f}" for v in row) + f",{label}" for row, label in zip(x[:300], y[:300])]
    paths["csv"].write_text("\n".join(rows) + "\n")
    return paths


@pytest.fixture(scope="session")
def digit_images(tmp_path_factory) -> Path:
    """The digits as a folder of class subfolders of small grayscale PNGs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digit_images")
    data = load_digits()
    for i, (image, label) in enumerate(zip(data.images[:200], data.target[:200])):
        folder = root / str(label)
        folder.mkdir(exist_ok=True)
        Image.fromarray((image * 255 / 16).astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


def run_graph(engine: str, model, feed: dict, output: str) -> np.ndarray:
    """One output of a standalone ONNX graph (a gradient graph, a rule under test) on onnxruntime or OpenVINO (f32)."""
    data = model.SerializeToString()
    if engine == "onnxruntime":
        from edgeadapt.runtime.ort import onnxruntime_module

        session = onnxruntime_module().InferenceSession(data, providers=["CPUExecutionProvider"])
        return session.run([output], feed)[0]
    from edgeadapt.runtime.ov import openvino_device

    core = openvino_device("CPU")
    compiled = core.compile_model(core.read_model(data, b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(feed)[compiled.output(output)]


def run_without_torch(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter where `import torch` fails, as on a device."""
    prelude = "import sys\nsys.modules['torch'] = None\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeadapt", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parent)


@pytest.fixture
def digit_image_npz(tmp_path) -> Path:
    """300 of the digits as uint8 8×8 images in an .npz (the runtime resizes them to the model's input)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path / "digit_images.npz"
    np.savez(path, x=(digits.images[:300] * 255 / 16).astype(np.uint8), y=digits.target[:300].astype(str))
    return path


# ---- the independent reference for training steps: torch in float64 ----------------------------------------------

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8


def expected_groups(module, head: str, pretrained: bool, optimizer: str = "adamw", weight_decay: float = 0.01,
                    ratio: float | None = None) -> dict[str, tuple[float, float]]:
    """Per parameter, the (lr multiplier, decay) the README promises: a pretrained backbone learns at 0.1× the
    head's rate, random weights and LoRA's new adapters at 1×; tensors of rank ≤ 1 are not decayed; SGD has no
    decay."""
    ratio = (0.1 if pretrained else 1.0) if ratio is None else ratio
    groups = {}
    for name, p in module.named_parameters():
        in_head = name == head or name.startswith(head + ".")
        decay = weight_decay if optimizer == "adamw" and p.dim() > 1 else 0.0
        adapter = name.endswith((".lora_A", ".lora_B"))
        groups[name] = (1.0 if in_head or adapter else ratio, decay)
    return groups


class TorchSteps:
    """Training steps of `module` (eval mode, cross-entropy) in float64 (or `dtype`) with the update runtime/
    COMPATIBILITY.md documents (SGD, or AdamW with ε outside √v and the decoupled decay after the update), each
    tensor at its group's rate and decay. `step(params)` first loads `params` (flat, in `trainable` order): checking
    an engine step by step from its own parameters keeps fp32/float64 differences from compounding (a ReLU input
    that crosses zero in one and not the other sends two 20-step trajectories apart). `head`: the name of the
    module that gives the model's output, when only its parameters train: its input is computed once (the frozen
    backbone in eval mode gives the same features every step) and each step runs the head alone."""

    def __init__(self, module, trainable: list[str], groups: dict[str, tuple[float, float]], optimizer: str,
                 lr: float, x: np.ndarray, y: np.ndarray, dtype: str = "float64", head: str | None = None):
        import copy

        import torch

        self.torch, self.optimizer, self.lr, self.groups, self.trainable = torch, optimizer, lr, groups, trainable
        self.model = copy.deepcopy(module).to(getattr(torch, dtype)).eval()
        named = dict(self.model.named_parameters())
        self.params = [named[n] for n in trainable]
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.inputs, self.labels = torch_input(x, self.params[0].dtype), torch.from_numpy(y).long()
        self.t = 0
        self.zero_gradients: set[str] = set()
        self.head = self.model.get_submodule(head) if head else None
        assert head is None or all(n.startswith(f"{head}.") for n in trainable), "only the head may train"
        self._features = None

    def _logits(self):
        if self.head is None:
            return self.model(self.inputs)
        if self._features is None:
            captured = []
            hook = self.head.register_forward_pre_hook(lambda _, args: captured.append(args))
            with self.torch.no_grad():
                whole = self.model(self.inputs)
            hook.remove()
            self._features = captured[0]
            assert self.torch.equal(self.head(*self._features), whole), "the head's output is not the model's"
        return self.head(*self._features)

    def step(self, params: np.ndarray | None = None) -> tuple[float, np.ndarray]:
        torch = self.torch
        if params is not None:
            self._load(params)
        self.t += 1
        loss = torch.nn.functional.cross_entropy(self._logits(), self.labels)
        grads = torch.autograd.grad(loss, self.params)
        largest = max(float(g.norm()) for g in grads)
        # zero in exact arithmetic (attention's key bias: softmax ignores a per-row shift); fp32 leaves rounding
        self.zero_gradients = {n for n, g in zip(self.trainable, grads) if float(g.norm()) <= 1e-12 * largest}
        beta1, beta2 = ADAM_BETAS
        with torch.no_grad():
            for i, (name, p, g) in enumerate(zip(self.trainable, self.params, grads)):
                scale, decay = self.groups[name]
                rate = self.lr * scale
                if self.optimizer == "sgd":
                    p -= rate * g
                    continue
                self.m[i] = beta1 * self.m[i] + (1 - beta1) * g
                self.v[i] = beta2 * self.v[i] + (1 - beta2) * g * g
                step = rate * (1 - beta2 ** self.t) ** 0.5 / (1 - beta1 ** self.t)
                p -= step * self.m[i] / (self.v[i].sqrt() + ADAM_EPS)
                p *= 1 - rate * decay
        return float(loss.detach()), self.flat()

    def flat(self) -> np.ndarray:
        return self.torch.cat([p.detach().reshape(-1) for p in self.params]).double().numpy()

    def _load(self, params: np.ndarray) -> None:
        offset = 0
        with self.torch.no_grad():
            for p in self.params:
                p.copy_(self.torch.from_numpy(params[offset:offset + p.numel()].reshape(p.shape)))
                offset += p.numel()


def torch_float64_steps(module, trainable: list[str], groups: dict[str, tuple[float, float]], optimizer: str,
                        lr: float, x: np.ndarray, y: np.ndarray, steps: int,
                        dtype: str = "float64") -> tuple[np.ndarray, np.ndarray]:
    """`steps` TorchSteps from the module's own parameters: the loss at every step and the final tensors, flat."""
    steps_ = TorchSteps(module, trainable, groups, optimizer, lr, x, y, dtype)
    losses = [steps_.step()[0] for _ in range(steps)]
    return np.array(losses), steps_.flat()
