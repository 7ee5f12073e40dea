"""ImageNet-pretrained starting points through torchvision's weights API (paper Sec. 4.1, Flowers102).

The paper's Flowers102 teacher (ResNet-34) and student (ResNet-18) start from ImageNet weights.
``StageConfig.pretrained`` names the torchvision weights enum member (e.g. ``IMAGENET1K_V1``);
:func:`load_pretrained` copies every tensor whose name and shape match into the registry model,
so the 1000-class ``fc`` (and a ``conv1`` rebuilt for another stem or channel count) keep their
fresh initialisation.

Files: torchvision's own cache, ``<torch.hub.get_dir()>/checkpoints/<file name of the weights URL>``
(``$TORCH_HOME/hub/checkpoints/`` when ``TORCH_HOME`` is set). A present file is read with
``torch.load(weights_only=True)``; an absent one is fetched with the weights API
(``Weights.get_state_dict``) where there is internet, and otherwise the run stops with one line
naming the missing file and where to put it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from db3kd.errors import DB3KDError

__all__ = ["WEIGHT_ENUMS", "weights_enum", "weights_file", "load_pretrained"]

#: registry architecture -> torchvision weights enum (class name in torchvision.models)
WEIGHT_ENUMS = {"resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights"}


def weights_enum(arch: str, weights: str):
    """torchvision's weights enum member for (arch, weights); DB3KDError for anything unknown."""
    import torchvision.models as tvm

    if arch not in WEIGHT_ENUMS:
        raise DB3KDError(f"no pretrained weights for {arch!r}; available for: {', '.join(WEIGHT_ENUMS)}")
    enum = getattr(tvm, WEIGHT_ENUMS[arch])
    try:
        return enum[weights]
    except KeyError:
        raise DB3KDError(f"unknown weights {weights!r} for {arch}; torchvision offers: "
                         f"{', '.join(m.name for m in enum)}") from None


def weights_file(arch: str, weights: str) -> Path:
    """Where torchvision keeps (or would download) the weights file of (arch, weights)."""
    import torch

    url = weights_enum(arch, weights).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_pretrained(model, arch: str, weights: str, *, download: bool = True) -> dict:
    """Copy the pretrained tensors of (arch, weights) whose names and shapes match into ``model`` (in place).

    Returns ``{"file", "sha256" (16 hex digits of the file, None if downloaded into memory only),
    "loaded": number of tensors copied, "kept": names left at their initialisation}``. Raises
    DB3KDError naming the missing file when it is absent and cannot be downloaded (or
    ``download=False``).
    """
    import torch

    enum = weights_enum(arch, weights)
    path = weights_file(arch, weights)
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=True)
    elif not download:
        raise DB3KDError(f"pretrained weights for {arch} ({weights}) not found: {path}; copy {enum.url} there")
    else:
        try:
            state = enum.get_state_dict(progress=False)
        except Exception as exc:  # noqa: BLE001 - offline: URLError, socket errors, ...
            raise DB3KDError(f"pretrained weights for {arch} ({weights}) not found at {path} and not downloadable "
                             f"({type(exc).__name__}); copy {enum.url} there") from None
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and tuple(own[k].shape) == tuple(v.shape)}
    if not usable:
        raise DB3KDError(f"pretrained weights {path} share no tensor with the {arch} model: wrong file?")
    model.load_state_dict(usable, strict=False)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None
    return {"file": str(path), "sha256": digest, "loaded": len(usable), "kept": sorted(set(own) - set(usable))}
