"""A competing process for bench/generate_vs_vllm.py --competing: fp32 1024 x 1024 matmuls on THREADS threads
until it is terminated.

    python bench/peers/competing_load.py THREADS
"""

import sys

import torch

torch.set_num_threads(int(sys.argv[1]))
a = torch.randn(1024, 1024)
while True:
    a = torch.tanh(a @ a)
