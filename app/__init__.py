"""Federated QLoRA instruction tuning of Gemma2 with Flower (FedAvg or FlexLoRA).

bitsandbytes logs, on every import on a CPU host, that an optional hub kernel package is
missing. Nothing here uses it (4-bit training needs CUDA), and every process that imports
`app` would print it, once per client: its logger is quietened before anything imports it.
"""

import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
