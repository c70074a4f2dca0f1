"""Helpers shared by the test files (tests/ is on sys.path under pytest's default import mode)."""

import torch


def cpu_twin_available() -> bool:
    """Whether the C++ twins (fastfcn.kernels.cpu) are built and loadable here."""
    return cpu_twin_problem() is None


def cpu_twin_problem() -> str | None:
    """Why the C++ twins cannot be used here, or None when they can."""
    try:
        from fastfcn.kernels import cpu

        return None if cpu.available() else "fastfcn.kernels.cpu.available() is False"
    except Exception as e:
        return f"{type(e).__name__}: {e}"


@torch.no_grad()
def randomize_batchnorm(model, mean=0.5, var=(0.5, 2.0), weight=(0.5, 1.5), bias=0.2, affine=True):
    """Give every BatchNorm2d non-trivial statistics (uniform in the given ranges), so that
    losing, mis-folding or mis-exporting them shows. Returns the model."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-mean, mean)
            mod.running_var.uniform_(*var)
            if affine:
                mod.weight.uniform_(*weight)
                mod.bias.uniform_(-bias, bias)
    return model
