"""MoEfication's model-independent algorithms (seed 004): neuron splits, expert-score criteria, feature shards.

`split` (random / contiguous / balanced k-means, with `assign` for the equal-size assignment) is pure numpy; the
model hooks, router training and conversion build on it elsewhere.
"""
from Models.moefication.split import (METHODS, adjusted_rand_index, expert_centroids, groups_from_labels,
                                      permutation, split_neurons)

__all__ = ["METHODS", "adjusted_rand_index", "expert_centroids", "groups_from_labels", "permutation",
           "split_neurons"]
