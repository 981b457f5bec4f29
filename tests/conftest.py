import os

# Triton kernels run in its interpreter on machines without a GPU. The variable is
# read when a kernel is decorated, so it must be set before any kernel module loads.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A rule's defect fails the test that meets it, where it happens, not as a site left unfused (core/driver.py).
os.environ.setdefault("ATTNFUSE_DEBUG", "1")
