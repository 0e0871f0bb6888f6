"""What the cost model charges for the bypass's rank-sized work, per device (used by ``AdapterLayer``)."""

from __future__ import annotations

#: The cost model's price of one multiply-add of the bypass's rank-sized work (matmuls r columns wide, grouped
#: convolutions, reshapes and passes over activations) in multiply-adds of a full-size matmul or convolution.
#: A CPU runs both at about the same rate.  A GPU runs full-size ops on its tensor cores many times faster than
#: the memory-bound rank-sized ones: on an H100 at 16,384 tokens, W + ΔW with its full-size weight gradient
#: matched or beat the bypass for LoRA, LoKr and LoHa on 768-wide linears (bf16 autocast) and 320-channel
#: 3×3 convolutions (float32) while doing 33–48 times its multiply-adds (benchmarks/README.md, "GPU"); at a
#: price of 32 LoKr's and LoRA's bypass was still kept there and measured slower.
ACCELERATOR_RANK_WORK_PRICE = 64.0


def rank_work_price(device_type: str) -> float:
    """How much one multiply-add of rank-sized work costs on ``device_type``, in full-size multiply-adds."""
    return 1.0 if device_type == "cpu" else ACCELERATOR_RANK_WORK_PRICE
