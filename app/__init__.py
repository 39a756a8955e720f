"""Federated QLoRA instruction tuning of Gemma2 with Flower (FedAvg or FlexLoRA)."""
