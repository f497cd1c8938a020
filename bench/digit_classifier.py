"""An MNIST digit classifier, trained in the benchmark itself, that scores a class-conditional
generator: class accuracy is the share of generated digits it assigns to the class they were
generated for (the "classification accuracy" of conditional GAN papers, e.g. Odena et al. 2017,
"Conditional Image Synthesis with Auxiliary Classifier GANs").

It trains on the same 32x32 training digits the GAN trains on and reports its own accuracy on
the test digits, so a reader can judge the judge. Generated images go through the same uint8
quantisation as the real ones before it sees them.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.data.decode import decode_sample
from pipeline.data.manifest import load_manifest, manifest_shards
from pipeline.data.shards import iter_samples
from pipeline.export import generate
from pipeline.images import from_uint8, to_uint8
from pipeline.models.conditioning import class_labels


def labelled_digits(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(images N x H x W x C uint8, labels N) of a prepared dataset's train split, in shard order."""
    manifest = load_manifest(folder)
    shape = (manifest["resolution"], manifest["resolution"], manifest["channels"])
    images, labels = [], []
    for entry in manifest_shards(manifest, "train"):
        for _, _, files in iter_samples(entry.url):
            image, label = decode_sample(files, shape)
            images.append(image)
            labels.append(label)
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)


def classifier(num_classes: int = 10) -> nn.Module:
    """Two conv layers and two dense ones (pytorch/examples' MNIST net, narrower dense layer)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.LazyLinear(128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 1000) -> float:
    """Share of uint8 images the model assigns to their label."""
    model.eval()
    right = sum(
        (model(from_uint8(images[i : i + batch])).argmax(1) == labels[i : i + batch]).sum().item()
        for i in range(0, len(images), batch)
    )
    return right / len(images)


def train_classifier(train_folder: Path, test_folder: Path, epochs: int = 3, seed: int = 0) -> tuple[nn.Module, float]:
    """(the classifier, its accuracy on the test digits), trained with Adam(1e-3), batch 128."""
    torch.manual_seed(seed)
    images, labels = labelled_digits(train_folder)
    test_images, test_labels = labelled_digits(test_folder)
    model = classifier(int(labels.max()) + 1)
    model(from_uint8(images[:2]))  # materialise the lazy layer before the optimiser sees it
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    started, steps = time.time(), epochs * (len(images) // 128)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(images))
        for step, i in enumerate(range(0, len(images) - 127, 128)):
            chosen = order[i : i + 128]
            loss = F.cross_entropy(model(from_uint8(images[chosen])), labels[chosen])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            done = epoch * (len(images) // 128) + step + 1
            if done % 200 == 0 or done == steps:
                rate = done / (time.time() - started)
                print(
                    f"classifier: step {done}/{steps}, {rate:.1f} step/s, ETA {(steps - done) / rate:.0f} s", flush=True
                )
    return model, accuracy(model, test_images, test_labels)


@torch.no_grad()
def class_accuracy(
    model: nn.Module, generator: nn.Module, n: int = 2000, seed: int = 0, batch: int = 250
) -> tuple[float, list[float]]:
    """(share of n class-balanced generated digits classified as their class, that share per class)."""
    classes = generator.num_classes
    right, total = torch.zeros(classes), torch.zeros(classes)
    latents = torch.Generator().manual_seed(seed)
    for start in range(0, n, batch):
        size = min(batch, n - start)
        labels = class_labels(classes, size, start=start)
        images = to_uint8(generate(generator, torch.randn(size, generator.latent_dim, generator=latents), labels))
        predicted = model.eval()(from_uint8(images)).argmax(1)
        right += torch.bincount(labels[predicted == labels], minlength=classes).float()
        total += torch.bincount(labels, minlength=classes).float()
    return float(right.sum() / total.sum()), [round(float(r / t), 4) for r, t in zip(right, total, strict=True)]
