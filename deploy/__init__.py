"""Lays the federation out over GPUs and machines, and starts it."""
