"""Helpers shared by the test files (tests/ is on sys.path under pytest's default import mode)."""

import torch


def cpu_twin_available() -> bool:
    """Whether the C++ twins (fastfcn.kernels.cpu) are built and loadable here."""
    try:
        from fastfcn.kernels import cpu

        return bool(cpu.available())
    except Exception:
        return False


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


EXPORT_WIDTH = 0.125


def export_model(arch: str, width: float = EXPORT_WIDTH):
    """The seeded model the ONNX tests export: width 0.125, seed 0, eval mode; DeconvNet with
    non-trivial BatchNorm statistics, so that the exported BatchNorm is really tested."""
    from fastfcn import models

    torch.manual_seed(0)
    m = models.build(arch, width=width).eval()
    if arch == "deconvnet":
        randomize_batchnorm(m, affine=False)
    return m
