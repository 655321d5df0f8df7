"""Top-1/top-5 accuracy of float and int8 outputs when the evaluation folder is ImageFolder-labelled."""
from __future__ import annotations

import numpy as np

from mixnet_deploy.models import LoadedModel
from mixnet_deploy.parity import top_classes


def class_index(folder: str, loaded: LoadedModel) -> int | None:
    """A folder name as a class index: a label of the model, a number, or an ImageNet synset."""
    if loaded.labels and folder in loaded.labels:  # first: labels "1".."10" are not indices 1..10
        return loaded.labels.index(folder)
    if folder.isascii() and folder.isdigit():  # not '²', which isdigit() takes
        return int(folder)
    if loaded.labels and len(loaded.labels) == 1000 and folder.startswith("n") and folder[1:].isdigit():
        from timm.data import ImageNetInfo

        names = ImageNetInfo().label_names()
        return names.index(folder) if folder in names else None
    return None


def accuracy(reference: np.ndarray, candidate: np.ndarray, folders: list[str], loaded: LoadedModel) -> dict | None:
    """Top-1/top-5 of both models and the drop in points, or None when folders are not classes."""
    targets = [class_index(f, loaded) for f in folders]
    if any(t is None or t >= reference.shape[1] for t in targets):  # folders 2023, 2024: not classes
        return None
    t = np.asarray(targets)

    def topk(out: np.ndarray, k: int) -> float:
        return float(np.mean([ti in row for ti, row in zip(t, top_classes(out, k))]) * 100)

    result = {"float_top1": topk(reference, 1), "int8_top1": topk(candidate, 1),
              "float_top5": topk(reference, 5), "int8_top5": topk(candidate, 5)}
    result["top1_drop_points"] = result["float_top1"] - result["int8_top1"]
    return result
