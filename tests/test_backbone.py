"""DINOv3Backbone behaviour: masking, resolutions, intermediate layers, gradients (also under DDP), drop path,
RoPE rescaling and gradient checkpointing. Tiny models, CPU only."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinov3_pl.models.backbone import DINOv3Backbone

TINY = dict(depth=2, embed_dim=64, num_heads=2, patch_size=4, img_size=32)


def tiny(seed: int = 0, arch: str = "vit_small_patch16_dinov3_qkvb", layerscale: float | None = None, **kw):
    torch.manual_seed(seed)
    backbone = DINOv3Backbone(arch, **{**TINY, **kw})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random init leaves biases/tokens at zero and LayerScale at 1e-5: perturb everything
        for name, param in backbone.named_parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
            if layerscale is not None and "gamma" in name:
                param.fill_(layerscale)
    return backbone


def images(batch: int = 2, height: int = 32, width: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def test_outputs_shapes_and_masking():
    backbone = tiny().eval()
    x = images()
    with torch.no_grad():
        plain = backbone(x)
        all_false = backbone(x, masks=torch.zeros(2, 64, dtype=torch.bool))
        masks = torch.zeros(2, 64, dtype=torch.bool)
        masks[0, :10] = True
        masked = backbone(x, masks=masks)
    assert (
        plain["cls"].shape == (2, 64) and plain["storage"].shape == (2, 4, 64) and plain["patch"].shape == (2, 64, 64)
    )
    for key in plain:
        assert torch.equal(plain[key], all_false[key]), key
    # Image 0 is masked: its outputs change; image 1 is not: its outputs are exactly those of the plain forward.
    assert (masked["patch"][0] - plain["patch"][0]).abs().max() > 1e-3
    assert (masked["cls"][0] - plain["cls"][0]).abs().max() > 1e-3
    torch.testing.assert_close(masked["patch"][1], plain["patch"][1])
    # A masked patch is built from mask_token alone: two images masked everywhere give the same outputs.
    full = backbone(images(seed=1), masks=torch.ones(2, 64, dtype=torch.bool))
    torch.testing.assert_close(full["patch"][0], full["patch"][1])
    with pytest.raises(ValueError, match=r"masks must be \[B, N\] = \(2, 64\)"):
        backbone(x, masks=torch.zeros(2, 63, dtype=torch.bool))


def test_any_resolution_divisible_by_patch():
    torch.manual_seed(0)
    small = DINOv3Backbone("vit_small_patch16_dinov3", depth=2).eval()
    with torch.no_grad():
        out = small(images(1, 224, 160))
    assert out["patch"].shape == (1, 14 * 10, 384)
    backbone = tiny().eval()
    for height, width in [(32, 32), (36, 20), (8, 64), (4, 4)]:
        with torch.no_grad():
            out = backbone(images(2, height, width))
        assert out["patch"].shape == (2, (height // 4) * (width // 4), 64)
        assert torch.isfinite(out["patch"]).all()
    with pytest.raises(ValueError, match=r"image size 30x32 is not divisible by the patch size 4"):
        backbone(images(2, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        backbone(torch.zeros(3, 32, 32))


def test_intermediate_layers_match_a_truncated_model():
    backbone = tiny().eval()
    # Independent reference for block 0: a depth-1 model with the same weights, run through forward().
    shallow = DINOv3Backbone("vit_small_patch16_dinov3_qkvb", **{**TINY, "depth": 1}).eval()
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("vit.blocks.1.")}
    shallow.load_state_dict(state)
    x = images(2, 24, 16)
    with torch.no_grad():
        final, first = backbone(x), shallow(x)
        last = backbone.get_intermediate_layers(x, n=1)
        both = backbone.get_intermediate_layers(x, n=2, return_class_token=True, return_extra_tokens=True)
        explicit = backbone.get_intermediate_layers(x, n=[0, -1], reshape=True, return_class_token=True)
        raw = backbone.get_intermediate_layers(x, n=[1], norm=False)
    assert len(last) == 1 and torch.equal(last[0], final["patch"])
    (patch0, cls0, storage0), (patch1, cls1, storage1) = both
    torch.testing.assert_close(patch0, first["patch"])
    torch.testing.assert_close(cls0, first["cls"])
    torch.testing.assert_close(storage0, first["storage"])
    assert torch.equal(patch1, final["patch"]) and torch.equal(cls1, final["cls"])
    assert torch.equal(storage1, final["storage"])
    (map0, map_cls0), (map1, _) = explicit
    assert map0.shape == (2, 64, 6, 4)
    torch.testing.assert_close(map0, first["patch"].reshape(2, 6, 4, 64).permute(0, 3, 1, 2))
    torch.testing.assert_close(map1, final["patch"].reshape(2, 6, 4, 64).permute(0, 3, 1, 2))
    torch.testing.assert_close(map_cls0, first["cls"])
    # norm=False returns the block output before the final norm.
    torch.testing.assert_close(backbone.vit.norm(raw[0]), final["patch"])
    assert (raw[0] - final["patch"]).abs().max() > 1e-2
    with pytest.raises(ValueError, match=r"block indices \[2\] out of range"):
        backbone.get_intermediate_layers(x, n=[2])


def test_every_parameter_gets_a_gradient():
    backbone = tiny().train()
    masks = torch.rand(2, 64, generator=torch.Generator().manual_seed(0)) > 0.5
    out = backbone(images(), masks=masks)
    (out["cls"].square().sum() + out["patch"].square().sum() + out["storage"].sum()).backward()
    for name, param in backbone.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
    # Without masks mask_token is still in the graph (a zero gradient), so DDP never sees it unused.
    backbone.zero_grad(set_to_none=True)
    backbone(images())["cls"].sum().backward()
    assert backbone.mask_token.grad is not None and torch.count_nonzero(backbone.mask_token.grad) == 0


def _ddp_worker(rank: int, world_size: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.set_num_threads(1)
        model = torch.nn.parallel.DistributedDataParallel(tiny(), find_unused_parameters=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):  # DDP reports unused parameters at the start of the *next* iteration
            masks = None if step != 1 else torch.ones(2, 64, dtype=torch.bool)
            out = model(images(seed=rank * 10 + step), masks=masks)
            loss = out["cls"].square().mean() + out["patch"].square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if rank == 0:
            torch.save({k: v.detach() for k, v in model.module.state_dict().items()}, result_file)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_step_without_masks_has_no_unused_parameters(tmp_path):
    result = tmp_path / "rank0.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # spawn, not fork: forking a process with live threads (OpenMP, zmq from other tests) can deadlock.
    mp.start_processes(
        _ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(result)), nprocs=2, join=True, start_method="spawn"
    )
    trained = torch.load(result, weights_only=True)
    initial = tiny().state_dict()
    assert (trained["vit.cls_token"] - initial["vit.cls_token"]).abs().max() > 0
    assert (trained["mask_token"] - initial["mask_token"]).abs().max() > 0  # step 1 was masked


def test_drop_path_uniform_or_ramp():
    uniform = DINOv3Backbone("vit_small_patch16_dinov3", **{**TINY, "depth": 4}, drop_path_rate=0.3)
    ramp = DINOv3Backbone(
        "vit_small_patch16_dinov3", **{**TINY, "depth": 4}, drop_path_rate=0.3, drop_path_uniform=False
    )
    rates = [[getattr(b, name).drop_prob for name in ("drop_path1", "drop_path2")] for b in uniform.vit.blocks]
    assert rates == [[0.3, 0.3]] * 4
    ramp_rates = [getattr(b.drop_path2, "drop_prob", 0.0) for b in ramp.vit.blocks]
    assert ramp_rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    # Drop path is active in training (outputs vary between forwards) and off in eval.
    uniform.train()
    x = images()
    with torch.no_grad():
        assert not torch.equal(uniform(x)["patch"], uniform(x)["patch"])
        uniform.eval()
        assert torch.equal(uniform(x)["patch"], uniform(x)["patch"])


def test_rope_rescale_only_in_training():
    # LayerScale 1.0 so that attention (where RoPE acts) visibly moves the outputs.
    rescaled = tiny(layerscale=1.0, rope_rescale=2.0)
    plain = tiny(layerscale=1.0)
    x = images()
    with torch.no_grad():
        rescaled.train()
        first, second = rescaled(x)["patch"], rescaled(x)["patch"]
        plain.train()
        plain_train = plain(x)["patch"]
        rescaled.eval(), plain.eval()
        eval_first, eval_second, plain_eval = rescaled(x)["patch"], rescaled(x)["patch"], plain(x)["patch"]
    assert (first - second).abs().max() > 1e-3
    assert torch.equal(eval_first, eval_second) and torch.equal(eval_first, plain_eval)
    assert torch.equal(plain_train, plain_eval)  # without rescaling, train mode changes nothing here
    with pytest.raises(ValueError, match="rope_rescale"):
        tiny(rope_rescale=0.5)


def test_grad_checkpointing_gives_the_same_gradients():
    x, masks = images(), torch.rand(2, 64, generator=torch.Generator().manual_seed(3)) > 0.7
    grads = []
    for checkpointing in (False, True):
        backbone = tiny(grad_checkpointing=checkpointing).train()
        out = backbone(x, masks=masks)
        (out["cls"].square().sum() + out["patch"].square().sum()).backward()
        grads.append({name: param.grad.clone() for name, param in backbone.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_timm_overrides_written_as_text_become_numbers():
    """A free-form dict option from the command line arrives as text ('1e-5'); it must reach timm as a number."""
    from dinov3_pl.models.weights import numbers_from_text

    assert numbers_from_text({"init_values": "1.0e-5", "depth": "2", "act_layer": "gelu", "x": "-.5"}) == {
        "init_values": 1e-5,
        "depth": 2,
        "act_layer": "gelu",
        "x": -0.5,
    }
    backbone = DINOv3Backbone(
        "vit_small_patch16_dinov3", depth="1", embed_dim="32", num_heads="2", img_size=16, init_values="1e-5"
    )
    assert len(backbone.vit.blocks) == 1
    assert torch.allclose(backbone.vit.blocks[0].gamma_1, torch.full((32,), 1e-5))
