"""Bench-only probe for issue 24, lever 4 (not product code): what Flower 1.42's SuperNode waits cost.

On PYTHONPATH, this runs at every interpreter start; in a `flower-supernode` process it
shortens the module's two literal waits, the 3 s after a pull that found no message and the
0.5 s polls for a reply, to 0.2 s and 0.05 s. Pair it with Flower's own
FLWR_SUPEREXEC_TASK_POLL_INTERVAL (default 1 s) for the SuperExec. If the round pays, the
product gets one module of its own that does this at process start, with a setting to turn
it off (the issue's terms); this file only measures.
"""

import sys
import time
import types

if any(arg.endswith("flower-supernode") for arg in sys.orig_argv[:2]):
    import flwr
    from flwr.supernode import start_client_internal

    assert flwr.__version__ == "1.42.0", flwr.__version__
    _sleep = time.sleep
    shim = types.ModuleType("time")
    shim.__dict__.update(time.__dict__)
    shim.sleep = lambda seconds: _sleep({3: 0.2, 0.5: 0.05}.get(seconds, seconds))
    start_client_internal.time = shim
