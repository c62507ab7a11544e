"""Fine-tuning: gate L1 regularisation, MAC budgets, optimiser groups, the training loop, torchrun."""
