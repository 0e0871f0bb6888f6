import torch

# Two threads on a 2-core machine with anything else running slow small ops down by orders of magnitude.
torch.set_num_threads(1)
torch.set_flush_denormal(True)
