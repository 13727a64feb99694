"""What a local backend needs beyond Slicer, checked from package metadata without importing anything."""

from __future__ import annotations

import shutil


# What a backend started with Slicer's Python needs beyond Slicer itself. numpy, scipy and SimpleITK ship with Slicer
# (not always with pip metadata, so they are not listed: a metadata check would reinstall them); torch comes from the
# PyTorch extension; the client is standard library only, so remote mode needs nothing.
LOCAL_BACKEND_REQUIREMENTS = ("monai>=1.4", "fastapi>=0.110", "uvicorn>=0.29", "python-multipart>=0.0.9",
                              "tqdm>=4.60")
TORCH_REQUIREMENT = "torch>=2.2"


def missing_requirements(requirements) -> list[str]:
    """The requirement strings that are not satisfied by installed distributions (nothing is imported)."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:  # packaging ships with Slicer and with pip; degrade to a presence check without it
        Requirement = None
    missing = []
    for text in requirements:
        if Requirement is not None:
            req = Requirement(text)
            name, spec = req.name, req.specifier
        else:
            name, spec = text.split(">")[0].split("=")[0].split("<")[0].strip(), None
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if spec is not None and not spec.contains(version, prereleases=True):
            missing.append(text)
    return missing


def torch_status(requirement: str = TORCH_REQUIREMENT) -> tuple[str, str | None]:
    """Whether the installed PyTorch satisfies `requirement`, from package metadata (torch is not imported: that
    takes seconds and cannot be undone in a running Slicer). Returns ("ok" | "missing" | "old", installed version).

    A torch importable without metadata (a build on the path) is taken as it is: there is nothing to compare."""
    import importlib.util
    from importlib import metadata

    name = requirement.split(">")[0].split("=")[0].split("<")[0].strip()
    try:
        version = metadata.version(name)
    except metadata.PackageNotFoundError:
        return ("ok", None) if importlib.util.find_spec(name) is not None else ("missing", None)
    return ("old", version) if missing_requirements([requirement]) else ("ok", version)


def which_python_slicer() -> str | None:
    """PythonSlicer next to the running Slicer, if any (the interpreter a local backend must use)."""
    return shutil.which("PythonSlicer")
