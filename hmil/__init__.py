"""Hierarchical multiple-instance learning for whole-slide images."""
