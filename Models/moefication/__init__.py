"""MoEfication's model-independent algorithms (seed 004): neuron splits, expert-score criteria, feature shards.

`split` (random / contiguous / balanced k-means, with `assign` for the equal-size assignment), `coactivation`
(co-activation graph → METIS → rebalance), `criteria` (per-expert scores, top-k targets, recall, coverage) and
`features` (the per-layer feature store) are pure numpy (+ pymetis for the graph split); the model hooks, router
training and conversion build on them elsewhere.
"""
from Models.moefication.criteria import (CRITERIA, coverage, expert_scores, ground_truth_select, recall_at_k,
                                         topk_targets)
from Models.moefication.split import (METHODS, adjusted_rand_index, expert_centroids, groups_from_labels,
                                      permutation, split_neurons)

__all__ = ["CRITERIA", "METHODS", "adjusted_rand_index", "coverage", "expert_centroids", "expert_scores",
           "ground_truth_select", "groups_from_labels", "permutation", "recall_at_k", "split_neurons",
           "topk_targets"]
