"""``dinov3-pl``: LightningCLI over every LightningModule and DataModule of the package.

``dinov3-pl fit --config configs/pretrain/demo_cpu.yaml``; ``--print_config`` shows every option; an unknown key
is a jsonargparse error that names it. Model and data are chosen by ``class_path`` (any LightningModule /
LightningDataModule subclass, including a user's own).
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI


def trainer_defaults() -> dict:
    """bf16 mixed precision on a GPU, fp32 on the CPU."""
    return {"precision": "bf16-mixed" if torch.cuda.is_available() else "32-true"}


class DINOv3CLI(LightningCLI):
    """LightningCLI with the project's trainer defaults, a config file that may be overwritten on reruns, and a
    ``ModelCheckpoint`` that is always there (configured under ``checkpoint:``; ``save_last`` on by default, so
    ``--ckpt_path last`` resumes)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("trainer_defaults", trainer_defaults())
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        super().__init__(*args, **kwargs)


def main(args: list[str] | None = None) -> DINOv3CLI:
    """Runs the CLI in-process (``args`` as on the command line) and returns it, for tests and notebooks."""
    return DINOv3CLI(args=args)


def console_main() -> None:
    """The ``dinov3-pl`` console script: exit status 0 on success (a returned object would become status 1)."""
    main()


if __name__ == "__main__":
    console_main()
