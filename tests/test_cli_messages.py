"""What a person reads when a ``dinov3-pl`` command is wrong: one line that says what to change (not the parser's
usage text and Union report, not a traceback), and where ``predict`` leaves its config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinov3_pl.cli import DINOv3ArgumentParser, main
from dinov3_pl.models.backbone import DINOv3Backbone

DEMO = ["fit", "--config", "configs/pretrain/demo_cpu.yaml"]


def error_lines(capsys, args: list[str], status: int) -> list[str]:
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == status
    lines = capsys.readouterr().err.strip().splitlines()
    assert not any(line.startswith(("usage:", "Traceback")) or "Subtypes:" in line for line in lines), lines
    assert lines[-1].startswith("error: "), lines
    return lines


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "--model.init_args.optim.learning_rate=0.1",
            "error: model.init_args.optim.learning_rate: OptimConfig has no option 'learning_rate'; "
            "did you mean model.init_args.optim.lr?",
        ),
        (
            "--data.init_args.batch_sise=3",
            "error: data.init_args.batch_sise: MultiCropDataModule has no option 'batch_sise'; "
            "did you mean data.init_args.batch_size?",
        ),
        (
            "--checkpoint.save_lst=true",
            "error: checkpoint.save_lst: no such option; did you mean --checkpoint.save_last?",
        ),
        ("--trainer.max_epochs=abc", "error: trainer.max_epochs: expected int, got abc"),
        (
            "--model.init_args.optm.lr=1",
            "error: model.init_args.optm: DINOSSLModule has no option 'optm'; did you mean model.init_args.optim?",
        ),
    ],
)
def test_a_config_typo_ends_in_the_line_that_says_what_to_change(capsys, override, expected):
    lines = error_lines(capsys, [*DEMO, override, "--print_config"], status=2)
    assert lines[-1] == expected and len(lines) <= 2  # a tip, then the line


def test_a_typo_in_a_yaml_file_names_the_key_and_its_closest_valid_one(tmp_path, capsys):
    config = tmp_path / "typo.yaml"
    config.write_text(Path("configs/pretrain/demo_cpu.yaml").read_text().replace("batch_size: 64", "batch_sise: 64"))
    lines = error_lines(capsys, ["fit", "--config", str(config), "--print_config"], status=2)
    assert lines[-1].endswith("did you mean data.init_args.batch_size?")


def test_a_missing_weights_file_is_the_error_of_building_the_model(capsys):
    lines = error_lines(capsys, [*DEMO, "--model.init_args.backbone.weights=/nonexistent.pth"], status=1)
    assert lines[-1].startswith("error: dinov3_pl.modules.ssl.DINOSSLModule: FileNotFoundError: ")
    assert "/nonexistent.pth" in lines[-1]


def test_weights_of_another_architecture_are_one_line(tmp_path, capsys):
    backbone = DINOv3Backbone("vit_small_patch16_dinov3", depth=2, embed_dim=64, num_heads=2, patch_size=8)
    torch.save(backbone.state_dict(), tmp_path / "other.pth")
    args = [
        "validate",
        "--config",
        "configs/eval/knn_synthetic.yaml",
        f"--model.init_args.weights={tmp_path}/other.pth",
    ]
    lines = error_lines(capsys, args, status=1)
    assert lines[-1].startswith("error: dinov3_pl.modules.knn.KNN: ValueError: ") and "(64, 64)" in lines[-1]


def test_a_truncated_ckpt_path_is_one_line_that_names_a_readable_one(tmp_path, capsys):
    good = tmp_path / "epoch=0-step=3.ckpt"
    torch.save({"global_step": 3, "state_dict": {"w": torch.zeros(1000)}}, good)
    broken = tmp_path / "last.ckpt"
    broken.write_bytes(good.read_bytes()[:-200])
    lines = error_lines(capsys, [*DEMO, f"--ckpt_path={broken}"], status=2)
    assert lines[-1].startswith(f"error: --ckpt_path {broken}: truncated or corrupt")
    assert lines[-1].endswith(f"the newest readable checkpoint there is {good}")
    assert "PytorchStreamReader" not in lines[-1]


def test_help_and_print_config_are_intact(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--help"])
    assert stop.value.code == 0
    assert "--checkpoint.preemption_signals" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        main([*DEMO, "--print_config"])
    printed = capsys.readouterr().out
    assert stop.value.code == 0 and "class_path: dinov3_pl.modules.ssl.DINOSSLModule" in printed
    assert "preemption_signals:\n  - SIGUSR1\n  - SIGTERM" in printed


def test_the_parser_raises_instead_of_exiting_when_asked():
    parser = DINOv3ArgumentParser(exit_on_error=False)
    parser.add_argument("--epochs", type=int)
    with pytest.raises(Exception, match="epochs"):
        parser.parse_args(["--epochs=abc"])


def test_predict_writes_its_config_next_to_the_output_file_not_in_the_current_folder(tmp_path, monkeypatch):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(2):
        Image.fromarray(np.full((32, 32, 3), 40 * index, dtype=np.uint8)).save(images / f"{index}.png")
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "out" / "features.pt"
    config = Path(__file__).parents[1] / "configs" / "predict_demo.yaml"
    main(
        [
            "predict",
            f"--config={config}",
            f"--data.init_args.root={images}",
            f"--model.init_args.output={output}",
            "--trainer.accelerator=cpu",
            "--trainer.enable_progress_bar=false",
        ]
    )
    assert output.exists() and not (tmp_path / "config.yaml").exists()
    saved = (tmp_path / "out" / "features.config.yaml").read_text()
    assert f"root: {images}" in saved and "class_path: dinov3_pl.modules.features.FeatureExtractor" in saved
