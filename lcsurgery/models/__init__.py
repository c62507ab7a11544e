"""Model definitions the library ships (CIFAR ResNets) and model-spec parsing."""
