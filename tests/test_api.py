"""The packages export their public names (as the README shows them), and those names are the submodules' objects."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = [
    "dinov3_pl",
    "dinov3_pl.losses",
    "dinov3_pl.models",
    "dinov3_pl.modules",
    "dinov3_pl.data",
    "dinov3_pl.callbacks",
]
README = Path(__file__).parents[1] / "README.md"


def test_imports_as_the_readme_names_them_are_the_submodule_objects():
    from dinov3_pl import DINOSSLModule as top_ssl
    from dinov3_pl import DINOv3Backbone as top_backbone
    from dinov3_pl.callbacks import PCAFeatureMaps
    from dinov3_pl.data import (
        ClassificationDataModule,
        DetectionDataModule,
        FashionMNIST,
        ImageFolder,
        MultiCropDataModule,
        SegmentationDataModule,
        SyntheticShapes,
    )
    from dinov3_pl.losses import DINOLoss, GramLoss, IBOTPatchLoss, KoLeoLoss, SoftmaxCenter, sinkhorn_knopp
    from dinov3_pl.models import (
        DINOHead,
        DINOv3Backbone,
        LinearSegmentationHead,
        SimpleFeaturePyramid,
        build_backbone,
        load_backbone_weights,
    )
    from dinov3_pl.modules import (
        KNN,
        Detection,
        DINOSSLModule,
        FeatureExtractor,
        FrozenBackboneModule,
        LinearProbe,
        Segmentation,
    )

    exported = {
        "dinov3_pl.callbacks.pca": [PCAFeatureMaps],
        "dinov3_pl.data.classification": [ClassificationDataModule],
        "dinov3_pl.data.datasets": [FashionMNIST, ImageFolder, SyntheticShapes],
        "dinov3_pl.data.dense": [DetectionDataModule, SegmentationDataModule],
        "dinov3_pl.data.multicrop": [MultiCropDataModule],
        "dinov3_pl.losses.centering": [SoftmaxCenter, sinkhorn_knopp],
        "dinov3_pl.losses.dino": [DINOLoss],
        "dinov3_pl.losses.gram": [GramLoss],
        "dinov3_pl.losses.ibot": [IBOTPatchLoss],
        "dinov3_pl.losses.koleo": [KoLeoLoss],
        "dinov3_pl.models.backbone": [DINOv3Backbone, top_backbone],
        "dinov3_pl.models.dense_heads": [LinearSegmentationHead, SimpleFeaturePyramid],
        "dinov3_pl.models.heads": [DINOHead],
        "dinov3_pl.models.weights": [build_backbone, load_backbone_weights],
        "dinov3_pl.modules.detection": [Detection],
        "dinov3_pl.modules.features": [FeatureExtractor],
        "dinov3_pl.modules.frozen": [FrozenBackboneModule],
        "dinov3_pl.modules.knn": [KNN],
        "dinov3_pl.modules.linear_probe": [LinearProbe],
        "dinov3_pl.modules.segmentation": [Segmentation],
        "dinov3_pl.modules.ssl": [DINOSSLModule, top_ssl],
    }
    for module_name, objects in exported.items():
        module = importlib.import_module(module_name)
        for obj in objects:
            assert getattr(module, obj.__name__) is obj, (module_name, obj.__name__)


def test_the_readme_layout_names_are_exported():
    # The README's "Layout" lines list each package's public names; every CamelCase or snake_case name there must
    # be importable from that package (prose such as "weight loading" is skipped).
    layout = README.read_text().split("## Layout", 1)[1].split("```")[1]
    checked = 0
    for line in layout.splitlines():
        match = re.match(r"dinov3_pl/(\w+)\s+(.*)", line)
        if not match or match.group(1) not in {"losses", "models", "modules", "callbacks", "data"}:
            continue
        package = importlib.import_module(f"dinov3_pl.{match.group(1)}")
        for item in re.sub(r"\([^)]*\)", "", match.group(2)).split(","):
            name = item.strip()
            if re.fullmatch(r"[A-Z]\w*[a-z]\w*|[A-Z]{2,}|[a-z]+_\w+", name) and name != "DataModules":
                assert name in package.__all__, (package.__name__, name)
                checked += 1
    assert checked >= 13  # the losses and modules lines alone name 13


@pytest.mark.parametrize("package_name", PACKAGES)
def test_every_name_in_all_resolves_to_an_object_of_the_package(package_name):
    package = importlib.import_module(package_name)
    assert len(set(package.__all__)) == len(package.__all__)
    namespace: dict = {}
    exec(f"from {package_name} import *", namespace)  # noqa: S102 - exactly what a user's star import does
    for name in package.__all__:
        value = getattr(package, name)
        assert namespace[name] is value
        assert value.__module__.startswith("dinov3_pl."), (name, value.__module__)


def test_importing_one_submodule_stays_cheap_and_cycle_free():
    # A fresh interpreter (~5 s: torch and timm): weights.py and backbone.py import names from each other, which
    # works from either entry point only while the package imports stay acyclic; the top-level names are lazy, so
    # Lightning and the DataModules stay unimported. The lazy names themselves are checked in-process above.
    code = (
        "import sys\n"
        "import dinov3_pl.models.weights\n"
        "assert not any(name.split('.')[0] == 'lightning' for name in sys.modules), 'lightning was imported'\n"
        "assert 'dinov3_pl.modules' not in sys.modules and 'dinov3_pl.data' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_every_import_line_of_the_readme_runs():
    """The README's Python examples import from the packages; each of those lines must work as written."""
    lines = [line.strip() for line in README.read_text().splitlines() if line.strip().startswith("from dinov3_pl")]
    assert len(lines) >= 3
    for line in lines:
        exec(line, {})  # noqa: S102 - the README's own import statements
