"""Built-in models by name: ``Segmenter("demo")``, ``fastfcn.load("demo")``, ``fastfcn info demo``.

A name maps to a checkpoint shipped inside the package (package data, found with
``importlib.resources``), so it works from any directory and after a plain, non-editable
``pip install``.

Precedence: a built-in name always means the built-in model, even where the current folder
holds a file of that name; to load such a file, name it as a path (``./demo``). This keeps a
command like ``fastfcn info demo`` meaning the same thing in every folder. Anything that is
not a built-in name is returned unchanged and read as a path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import CheckpointError

# name -> (file under fastfcn/assets, one line about it)
BUILTIN = {
    "demo": ("demo_fcn8s.safetensors",
             "FCN-8s at width 0.125 (2.1 M parameters) trained on the synthetic scenes; 6 classes"),
}


def builtin_path(name: str) -> Path:
    """The file of the built-in model ``name``; CheckpointError if it is not one or is missing."""
    if name not in BUILTIN:
        raise CheckpointError(f"{name!r} is not a built-in model; expected one of {sorted(BUILTIN)}")
    res = resources.files("fastfcn").joinpath("assets", BUILTIN[name][0])
    # A regular install (wheel, editable, source tree) gives a real file; a zipped install does not,
    # and safetensors needs a file it can map.
    path = Path(str(res))
    if not path.is_file():
        raise CheckpointError(
            f"the built-in model {name!r} ({BUILTIN[name][0]}) is missing from the installed package; "
            "reinstall fastfcn"
        )
    return path


def resolve(checkpoint):
    """``checkpoint`` as a path: a built-in name (a str that is a key of BUILTIN) becomes its file;
    anything else (paths, modules) is returned as it is."""
    if isinstance(checkpoint, str) and checkpoint in BUILTIN:
        return builtin_path(checkpoint)
    return checkpoint

