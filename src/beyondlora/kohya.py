"""``--network_module beyondlora.kohya`` for kohya sd-scripts (``train_network.py``, ``sdxl_train_network.py``).

The implementation lives in :mod:`beyondlora.integrations.kohya`.
"""

from .integrations.kohya import KohyaNetwork, create_network, create_network_from_weights

__all__ = ["KohyaNetwork", "create_network", "create_network_from_weights"]
