import os

import torch

from helpers.layer_cases import DEVICE

# Two threads on a 2-core machine with anything else running slow small ops down by orders of magnitude.
torch.set_num_threads(1)
torch.set_flush_denormal(True)

if DEVICE.type == "cpu":
    # The trainer takes a GPU whenever it sees one; the suite runs where BEYONDLORA_TEST_DEVICE says (and its
    # subprocesses inherit the choice).
    os.environ["BEYONDLORA_CPU"] = "1"
