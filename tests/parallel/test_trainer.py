"""The real training loop on a model-parallel forecaster (gloo): rollout loss, gradient clipping
and AdamW steps match the single-process trainer."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from parallel_workers import make_model, spawn, tiny_graph

from squall.parallel.parallelize import parallelize, prepare_parallel, reduce_loss
from squall.train.loop import Trainer, VariableLayout

# prognostic 0-2 (residual), forcings 3-4 (inputs only), diagnostic 5 (output only)
ROLES = {"prognostic": [0, 1, 2], "forcing": [3, 4], "diagnostic": [5]}
TRAINING = {"lr": 1e-3, "weight_decay": 0.01, "warmup_steps": 1, "max_steps": 4,
            "min_lr_ratio": 0.1, "precision": "fp32", "grad_clip": 0.05}  # fmt: skip
STEPS = 3


def _batches():
    gen = torch.Generator().manual_seed(5)
    # batch 2, two input steps, rollout 2, on the whole O8 grid
    return [{"x": torch.randn(2, 2, 544, 6, generator=gen), "y": torch.randn(2, 2, 544, 6, generator=gen)}
            for _ in range(STEPS)]  # fmt: skip


def _train(rank, world):
    g = tiny_graph()
    layout = VariableLayout.from_roles(ROLES)
    cfg = OmegaConf.create(TRAINING)
    ref = Trainer(make_model(g), layout, cfg, torch.device("cpu"), logger=None)
    ref_losses = [float(ref.train_step(b)[0]) for b in _batches()]

    run_cfg = OmegaConf.create({"parallel": {"model_parallel": world},
                                "model": {"processor_layers": 2}})  # fmt: skip
    setup = prepare_parallel(run_cfg, g)
    ids = torch.from_numpy(setup.grid_indices)
    model = parallelize(make_model(g), g, setup.config, setup.groups)
    trainer = Trainer(model, layout, cfg, torch.device("cpu"), logger=None)
    for step, b in enumerate(_batches()):
        local = {k: v.index_select(2, ids) for k, v in b.items()}  # what the dataset would read
        loss, grad_norm = trainer.train_step(local)
        total = float(reduce_loss(loss, setup.groups))
        assert abs(total - ref_losses[step]) <= 1e-5 * ref_losses[step], (step, total)
    for (name, p), q in zip(model.named_parameters(), ref.model.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name


def test_trainer_steps_match_the_single_process_run():
    spawn(_train, 2)
