"""Triton kernels for the mistral ops, their torch CUDA registrations, AOT PTX and TensorRT plugins."""
