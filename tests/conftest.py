"""Test set-up: Triton kernels run on CPU tensors through its interpreter."""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(__file__))
