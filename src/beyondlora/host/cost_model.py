"""What the cost model charges for the bypass's rank-sized work, per device (used by ``AdapterLayer``)."""

from __future__ import annotations

#: Full-size multiply-adds a GPU does in the time the bypass's rank-1 work does one, fitted to measurements.
#: The bypass's products with r-wide factors (matmuls r columns wide, grouped convolutions, reshapes and
#: passes over activations) are memory-bound at small ranks: their time is the activations they read,
#: whatever the rank, so each of their multiply-adds costs about ``ACCELERATOR_BALANCE / r`` full-size ones
#: (the order of a tensor-core GPU's compute-to-bandwidth ratio; an H100's is a few hundred per value read).
#: Measured on an H100 at 16,384 tokens with r = 8 (a price of 64): W + ΔW with its full-size weight gradient
#: matched or beat the bypass for LoRA, LoKr and LoHa on 768-wide linears (bf16 autocast) and 320-channel
#: 3×3 convolutions (float32) while doing 33–48 times its multiply-adds for LoRA and LoKr, 5–10 times for
#: LoHa (benchmarks/README.md, "On a GPU: step times"); at a price of 32 LoKr's and LoRA's bypass was still
#: kept there and measured slower.
ACCELERATOR_BALANCE = 512.0


def rank_work_price(device_type: str, rank: int = 1) -> float:
    """How much one multiply-add of the bypass's work at ``rank`` (1: elementwise, as (IA)³'s) costs on
    ``device_type``, in multiply-adds of a full-size matmul or convolution: 1 on a CPU, which runs both at
    about the same rate; ``max(1, ACCELERATOR_BALANCE / rank)`` on any other device."""
    if device_type == "cpu":
        return 1.0
    return max(1.0, ACCELERATOR_BALANCE / max(rank, 1))
