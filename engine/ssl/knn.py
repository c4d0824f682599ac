"""Weighted k-NN probe on frozen features (DINO's eval_knn): how good a backbone's embedding is, without training.

Features are L2-normalised; each test image takes its k most cosine-similar training images, each neighbour votes
for its label with weight exp(similarity / T); the top vote is the prediction. DINO's defaults: k 20, T 0.07.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


@torch.no_grad()
def extract_features(features_fn: Callable[[torch.Tensor], torch.Tensor], loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `features_fn` ((B, 3, H, W) -> (B, D)) over one pass of an evaluation loader (yielding Batch) ->
    (N, D) L2-normalised float32 features and (N,) labels, in the loader's order."""
    feats, labels = [], []
    for batch in loader.epoch(0):
        feats.append(F.normalize(features_fn(batch.images).float(), dim=1))
        labels.append(batch.labels)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024) -> float:
    """Top-1 accuracy in percent. train (N, D) / test (M, D) normalised features, (N,) / (M,) int labels."""
    k = min(k, train_features.shape[0])
    correct = torch.zeros((), dtype=torch.int64, device=test_features.device)   # read once, at the end
    bank = train_features.t()
    for start in range(0, test_features.shape[0], chunk):
        query = test_features[start:start + chunk]
        sims, idx = (query @ bank).topk(k, dim=1)                                   # (b, k)
        neighbours = train_labels[idx]                                              # (b, k)
        votes = torch.zeros(query.shape[0], num_classes, device=query.device, dtype=sims.dtype)
        votes.scatter_add_(1, neighbours, (sims / temperature).exp())
        correct += (votes.argmax(1) == test_labels[start:start + chunk]).sum()
    return 100.0 * correct.item() / max(1, test_features.shape[0])
