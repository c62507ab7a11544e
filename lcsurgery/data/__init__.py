"""Datasets (decoded once, cached) and fast batch loaders with CIFAR-style augmentation."""
