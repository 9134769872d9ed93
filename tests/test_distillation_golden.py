"""DistillationModule against upstream DINOv3's multi-distillation step (tests/fixtures/upstream_multidistillation.pt,
see experiments/golden/multidistillation.md).

The fixture holds only numbers: upstream's inputs (crops, iBOT masks with its ``mask_indices_list`` /
``masks_weight``), its frozen teacher's Sinkhorn-Knopp targets and every loss term of ``compute_losses``. The
weights are rebuilt here from seeds (``golden_weights``), in upstream's key names; the generator outside this
repository imported this file to make the very same weights.

Upstream's multi-distillation student sees its global crops *unmasked* (``SSLMetaArch.get_student_output`` passes
no masks when ``distillation.enabled``), and so do ours (``DINOStudent(mask_inputs=False)``). The fixture holds the
loss terms twice: ``distillation/*`` from upstream's step as it runs, and ``masked_student/*`` from the same step
with the student's global crops masked (upstream's self-distillation student path), against which our
self-distillation student (``DINOSSLModule``'s) is checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from dinov3_pl.modules import DINOSSLModule
from dinov3_pl.modules.distillation import DistillationModule
from dinov3_pl.modules.ssl_config import (
    BackboneConfig,
    DistillationTeacherConfig,
    HeadConfig,
    LossConfig,
    OptimConfig,
    StudentConfig,
)
from dinov3_pl.modules.teachers import DINOStudent
from tests.test_weights import make_upstream_state_dict

FIXTURE = Path(__file__).parent / "fixtures" / "upstream_multidistillation.pt"
RTOL, ATOL = 1e-5, 1e-6

ARCH = "vit_small_patch16_dinov3_qkvb"  # LayerNorm eps 1e-5, 4 storage tokens, qkv bias with K-bias mask
PATCH, GLOBAL_SIZE, LOCAL_SIZE = 4, 24, 12
# Upstream layouts (tests/test_weights.py: upstream_key_shapes) and the same networks as timm overrides.
TEACHER_LAYOUT = dict(embed_dim=64, depth=2, num_heads=2, ffn="mlp", ffn_hidden=256, patch=PATCH)
STUDENT_LAYOUT = dict(embed_dim=32, depth=2, num_heads=2, ffn="mlp", ffn_hidden=128, patch=PATCH)
TEACHER_TIMM = dict(embed_dim=64, depth=2, num_heads=2, patch_size=PATCH, img_size=GLOBAL_SIZE)
STUDENT_TIMM = dict(embed_dim=32, depth=2, num_heads=2, patch_size=PATCH, img_size=GLOBAL_SIZE)
# Separate DINO and iBOT heads of different sizes, as upstream's (262144/512/8192 and 98304/384/4096), shrunk.
DINO_HEAD = HeadConfig(num_prototypes=32, hidden_dim=48, bottleneck_dim=16, num_layers=3)
IBOT_HEAD = HeadConfig(num_prototypes=24, hidden_dim=40, bottleneck_dim=12, num_layers=3)
TEACHER_TEMPERATURE = 0.06
SEEDS = {
    "teacher.backbone": 11,
    "teacher.dino_head": 12,
    "teacher.ibot_head": 13,
    "student.backbone": 21,
    "student.dino_head": 22,
    "student.ibot_head": 23,
}
LOSS_TERMS = ("dino_global", "dino_local", "ibot", "koleo", "loss")


def make_head_state_dict(seed: int, in_dim: int, head: HeadConfig) -> dict[str, Tensor]:
    """A DINOHead's weights in upstream's (and our) key names ``mlp.{0,2,4}.*``, ``last_layer.weight``: unit-scale
    pre-activations and non-zero biases; prototype entries of std 0.5, so that the logits of the L2-normalised
    bottleneck have std ~0.5 and the teacher's targets at temperature 0.06 are sharp, not near uniform."""
    generator = torch.Generator().manual_seed(seed)
    dims = [in_dim] + [head.hidden_dim] * (head.num_layers - 1) + [head.bottleneck_dim]
    state_dict = {}
    for layer, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        state_dict[f"mlp.{2 * layer}.weight"] = torch.randn(d_out, d_in, generator=generator) / d_in**0.5
        state_dict[f"mlp.{2 * layer}.bias"] = 0.1 * torch.randn(d_out, generator=generator)
    state_dict["last_layer.weight"] = 0.5 * torch.randn(head.num_prototypes, head.bottleneck_dim, generator=generator)
    return state_dict


def golden_weights() -> dict[str, dict[str, Tensor]]:
    """Teacher and student weights (backbones in upstream's DinoVisionTransformer key names, heads in DINOHead's)."""
    weights = {}
    for owner, layout in (("teacher", TEACHER_LAYOUT), ("student", STUDENT_LAYOUT)):
        weights[f"{owner}.backbone"] = make_upstream_state_dict(SEEDS[f"{owner}.backbone"], **layout)
        for name, head in (("dino_head", DINO_HEAD), ("ibot_head", IBOT_HEAD)):
            weights[f"{owner}.{name}"] = make_head_state_dict(SEEDS[f"{owner}.{name}"], layout["embed_dim"], head)
    return weights


@pytest.fixture(scope="module")
def golden() -> dict:
    return torch.load(FIXTURE, weights_only=True)


@pytest.fixture(scope="module")
def ours(golden, tmp_path_factory) -> dict[str, Tensor]:
    """Our teacher targets and loss terms on the fixture's batch: a dinov3-pl teacher checkpoint written as a
    DINOSSLModule run writes it, a DistillationModule whose student carries upstream's student weights
    (``student/*``, ``loss``), and the same student built as DINOSSLModule builds its own (``ssl_student/*``)."""
    root = tmp_path_factory.mktemp("golden_distillation")
    weights = golden_weights()
    torch.save(weights["teacher.backbone"], root / "teacher.pth")
    torch.save(weights["student.backbone"], root / "student.pth")

    teacher_run = DINOSSLModule(
        backbone=BackboneConfig(arch=ARCH, weights=str(root / "teacher.pth"), timm_overrides=TEACHER_TIMM),
        dino_head=DINO_HEAD,
        ibot_head=IBOT_HEAD,
    )
    teacher_run.teacher.dino_head.load_state_dict(weights["teacher.dino_head"])
    teacher_run.teacher.ibot_head.load_state_dict(weights["teacher.ibot_head"])
    checkpoint = {"state_dict": teacher_run.state_dict()}
    teacher_run.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, root / "teacher.ckpt")

    student_backbone = BackboneConfig(arch=ARCH, weights=str(root / "student.pth"), timm_overrides=STUDENT_TIMM)
    module = DistillationModule(
        teacher=DistillationTeacherConfig(
            weights=str(root / "teacher.ckpt"),
            temperature=TEACHER_TEMPERATURE,
            temperature_warmup_start=TEACHER_TEMPERATURE,
        ),
        students=[
            StudentConfig(
                name="student",
                backbone=student_backbone,
                # The schedules need a run length; step 0 is all this test runs.
                optim=OptimConfig(total_steps=10, warmup_steps=0, freeze_last_layer_steps=0),
            )
        ],
    )
    ssl_student = DINOStudent(student_backbone.build(), DINO_HEAD, IBOT_HEAD, LossConfig())
    for student in (module.students["student"], ssl_student):
        student.dino_head.load_state_dict(weights["student.dino_head"])
        student.ibot_head.load_state_dict(weights["student.ibot_head"])
    batch_size = golden["global_crops"].shape[0] // 2
    module._global_batch_size = lambda: batch_size  # type: ignore[method-assign]
    module._build_schedules()
    module.eval()
    ssl_student.eval()
    batch = {key: golden[key] for key in ("global_crops", "local_crops", "masks")}
    with torch.no_grad():
        targets = module.teacher.targets(batch["global_crops"], batch["masks"], TEACHER_TEMPERATURE)
        losses = module.compute_losses(batch, step=0)
        ssl_terms, _ = ssl_student.losses(batch, targets)
    return {**targets, **losses, **{f"ssl_student/{key}": value for key, value in ssl_terms.items()}}


def test_the_fixture_is_the_documented_recipe(golden):
    """Inputs and masks follow upstream's collate conventions: crop-major crops, int(2B * 0.5) masked global crops,
    rows of the masked patches in ``masks.flatten()`` order, each weighted 1 / (masked patches of its crop)."""
    masks = golden["masks"]
    assert golden["global_crops"].shape == (6, 3, GLOBAL_SIZE, GLOBAL_SIZE)
    assert golden["local_crops"].shape == (9, 3, LOCAL_SIZE, LOCAL_SIZE)
    assert masks.shape == (6, (GLOBAL_SIZE // PATCH) ** 2)
    assert int((masks.sum(-1) > 0).sum()) == 3
    assert torch.equal(golden["mask_indices_list"], masks.flatten().nonzero().flatten())
    per_crop = (1 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    torch.testing.assert_close(golden["masks_weight"], per_crop)
    assert golden["teacher_temperature"].item() == pytest.approx(TEACHER_TEMPERATURE)


def test_teacher_targets_match_upstream(golden, ours):
    assert torch.equal(ours["mask_rows"], golden["mask_indices_list"])
    torch.testing.assert_close(ours["cls_probs"], golden["cls_centered"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(ours["patch_probs"], golden["masked_patch_centered"], rtol=RTOL, atol=ATOL)
    # Not degenerate. Sinkhorn-Knopp gives each of the 32 prototypes 1/32 of the 6 CLS rows' mass, so a row spreads
    # over >= 32/6 prototypes (max ~1/5); the 39 patch rows over 24 prototypes can be sharp.
    assert golden["cls_centered"].max() > 4 / DINO_HEAD.num_prototypes
    assert golden["masked_patch_centered"].max() > 0.5


@pytest.mark.parametrize("term", LOSS_TERMS)
def test_self_distillation_student_matches_upstream_with_masked_crops(golden, ours, term):
    """Our DINOStudent as self-distillation builds it (global crops masked) against upstream's step with its
    student's global crops masked (its self-distillation student path): the frozen teacher, separate heads,
    Sinkhorn-Knopp, DINO pair weights, iBOT weighting and KoLeo all agree."""
    torch.testing.assert_close(ours[f"ssl_student/{term}"], golden[f"masked_student/{term}"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    ("ours_key", "upstream_key"),
    [(f"student/{term}", f"distillation/{term}") for term in LOSS_TERMS]
    + [("loss", "distillation/loss")],  # the sum over the (one) student
)
def test_distillation_losses_match_upstream_multidistillation(golden, ours, ours_key, upstream_key):
    torch.testing.assert_close(ours[ours_key], golden[upstream_key], rtol=RTOL, atol=ATOL)
