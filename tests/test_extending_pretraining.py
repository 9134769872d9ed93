"""The pretraining part of docs/extending.md, run for real: a new method (BYOL on PretrainingModule), a new teacher
(a frozen DINO teacher in DINOSSLModule) and a new loss term (a variance term through extra_losses)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F

from dinov3_pl.models import build_backbone
from dinov3_pl.modules import DINOSSLModule
from dinov3_pl.modules.pretraining import PretrainingModule
from dinov3_pl.modules.ssl_config import BackboneConfig, OptimConfig
from dinov3_pl.modules.teachers import EMA, load_dino_teacher
from tests.test_distillation import HEAD, teacher_ckpt  # noqa: F401 - the fixture
from tests.test_ssl_fit import TINY, tiny_data, tiny_module, trainer


# ---------------------------------------------------------------------------- the user's code (as in the docs)
def mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, 256), nn.GELU(), nn.Linear(256, out_dim))


class BYOL(PretrainingModule):
    def __init__(
        self,
        backbone: BackboneConfig = BackboneConfig(),
        optim: OptimConfig = OptimConfig(),
        momentum: float = 0.99,
        max_consecutive_bad_steps: int = 10,
    ) -> None:
        super().__init__(max_consecutive_bad_steps)
        self.save_hyperparameters()
        self.optim = optim
        encoder = backbone.build()
        self.online = nn.ModuleDict(
            {"backbone": encoder, "projector": mlp(encoder.embed_dim, 128), "predictor": mlp(128, 128)}
        )
        self.target = EMA(self.encoder_and_projector())

    def encoder_and_projector(self) -> nn.ModuleDict:
        return nn.ModuleDict({"backbone": self.online.backbone, "projector": self.online.projector})

    def trained_modules(self):
        return {"online": dict(self.online)}

    def owner_optim(self, owner):
        return self.optim

    def eval_backbones(self):
        return {"target": "target.average.backbone.", "online": "online.backbone."}

    def compute_losses(self, batch, step):
        views = batch["global_crops"].unflatten(0, (2, -1))
        online = [self.online.predictor(self.online.projector(self.online.backbone(v)["cls"])) for v in views]
        with torch.no_grad():
            target = [self.target.average.projector(self.target.average.backbone(v)["cls"]) for v in views]
        byol = sum(
            2 - 2 * F.cosine_similarity(p, z.detach(), dim=-1).mean()
            for p, z in ((online[0], target[1]), (online[1], target[0]))
        )
        return {"byol": byol, "loss": byol}

    def after_optimizer_step(self, step):
        self.target.update(self.encoder_and_projector(), self.hparams.momentum)


class FrozenTeacherSSL(DINOSSLModule):
    def __init__(self, teacher_weights: str, **kwargs) -> None:
        self.teacher_weights = teacher_weights
        super().__init__(**kwargs)

    def build_teacher(self):
        return load_dino_teacher(self.teacher_weights, self.loss_config)


class VarianceRegularisedSSL(DINOSSLModule):
    def __init__(self, variance_weight: float = 0.1, **kwargs) -> None:
        super().__init__(**kwargs)
        self.variance_weight = variance_weight

    def extra_losses(self, batch, student_global, step):
        terms = super().extra_losses(batch, student_global, step)
        std = student_global["cls"].float().std(dim=0)
        terms["variance"] = (self.variance_weight, F.relu(1 - std).mean())
        return terms


# ---------------------------------------------------------------------------- the tests
OPTIM = OptimConfig(total_steps=6, warmup_steps=1, freeze_last_layer_steps=0, lr_scaling="none", layer_decay=1.0)


def byol() -> BYOL:
    return BYOL(backbone=BackboneConfig(timm_overrides=TINY, drop_path_rate=0.1), optim=OPTIM)


def test_a_new_method_gets_the_workflow_exact_resume_and_evaluation_for_free(tmp_path):
    def fit(root, max_steps, resume):
        L.seed_everything(0 if not resume else 3)
        module = byol()
        checkpoint = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
        run = trainer(root, max_steps=max_steps, max_epochs=-1, limit_train_batches=3, callbacks=[checkpoint])
        run.fit(module, tiny_data(num_local_crops=0), ckpt_path="last" if resume else None)
        return module, checkpoint

    straight, _ = fit(tmp_path / "straight", 5, resume=False)
    fit(tmp_path / "resumed", 3, resume=False)  # stops on the epoch boundary
    resumed, checkpoint = fit(tmp_path / "resumed", 5, resume=True)
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    # The checkpoint records the EMA target as the backbone to evaluate.
    evaluated = build_backbone(None, checkpoint.last_model_path)
    for key, value in resumed.target.average.backbone.state_dict().items():
        assert torch.equal(evaluated.state_dict()[key], value), key


def test_a_frozen_teacher_is_used_and_the_student_ema_is_what_gets_evaluated(teacher_ckpt, tmp_path):  # noqa: F811
    L.seed_everything(0)
    module = FrozenTeacherSSL(
        teacher_weights=teacher_ckpt,
        backbone=BackboneConfig(timm_overrides=dict(TINY, embed_dim=32)),
        dino_head=HEAD,
        ibot_head=HEAD,
        optim=OPTIM,
    )
    teacher_before = {k: v.clone() for k, v in module.teacher.state_dict().items()}
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer(tmp_path, max_steps=3, callbacks=[checkpoint]).fit(module, tiny_data())
    assert all(torch.equal(v, teacher_before[k]) for k, v in module.teacher.state_dict().items())
    saved = torch.load(checkpoint.last_model_path, map_location="cpu", weights_only=True)
    assert saved["backbone_config"]["prefix"] == "student_ema.average.backbone."
    evaluated = build_backbone(None, checkpoint.last_model_path)
    for key, value in module.student_ema.average.backbone.state_dict().items():
        assert torch.equal(evaluated.state_dict()[key], value), key


def test_a_new_loss_term_is_added_and_logged():
    module = VarianceRegularisedSSL(variance_weight=0.5, **tiny_module(lr_scaling="none").hparams)
    module._build_schedules()
    batch = _batch()
    losses = module.compute_losses(batch, step=0)
    assert "variance" in losses
    plain = {key: value for key, value in losses.items() if key not in ("variance", "loss")}
    expected = sum(_weighted(module, plain).values()) + 0.5 * losses["variance"]
    torch.testing.assert_close(losses["loss"], expected)


def _batch() -> dict:
    """One training batch as the step sees it: the crops leave the workers as uint8 and the DataModule normalises
    them after the (here: no) device transfer, as Lightning does."""
    data = tiny_data()
    data.setup("fit")
    return data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)


def _weighted(module: DINOSSLModule, terms: dict) -> dict:
    """DINOv3's weights for the tiny recipe: 2 global + 2 local crops, KoLeo x 0.1 x 2 crops."""
    global_pairs, local_pairs = 2, 2 * 2
    return {
        "dino_global": global_pairs / (global_pairs + local_pairs) * terms["dino_global"],
        "dino_local": local_pairs / (global_pairs + local_pairs) * terms["dino_local"],
        "ibot": terms["ibot"],
        "koleo": 0.1 * 2 * terms["koleo"],
    }


def test_switched_off_terms_are_not_built_or_computed():
    """ibot_weight 0: no iBOT head in student or teacher; koleo_weight 0: no KoLeo term."""
    hparams = tiny_module(lr_scaling="none").hparams
    module = DINOSSLModule(**{**hparams, "loss": {"ibot_weight": 0.0, "koleo_weight": 0.0}})
    module._build_schedules()
    assert module.student.ibot_head is None and module.teacher.ibot_head is None
    assert not any("ibot" in name for name, _ in module.named_parameters())
    losses = module.compute_losses(_batch(), step=0)
    assert set(losses) == {"dino_global", "dino_local", "loss"}
