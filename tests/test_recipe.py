"""Recipe: lr scaling, warmup + decay curves, weight-decay groups, the optimizers it builds."""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import condconv
from pipeline.recipe import Recipe, build_optimizer, build_scheduler, lr_factor, param_groups, scaled_lr


def test_lr_is_given_per_256_images_and_scaled_by_global_batch():
    recipe = Recipe(lr=0.016)
    assert scaled_lr(recipe, 256) == pytest.approx(0.016)
    assert scaled_lr(recipe, 4096) == pytest.approx(0.256)  # the reference TPU batch
    assert scaled_lr(recipe, 64) == pytest.approx(0.004)
    assert scaled_lr(Recipe(lr=0.1, lr_batch_size=128), 512) == pytest.approx(0.4)
    with pytest.raises(ValueError):
        scaled_lr(recipe, 0)


def test_warmup_then_exponential_step_decay_counted_from_epoch_zero():
    recipe = Recipe(warmup_epochs=5, schedule="exponential_step", decay_rate=0.97, decay_epochs=2.4)
    assert lr_factor(recipe, 0.0, 350) == 0.0
    assert lr_factor(recipe, 2.5, 350) == pytest.approx(0.5)
    assert lr_factor(recipe, 4.99, 350) == pytest.approx(4.99 / 5)
    # After warmup the staircase counts from epoch 0, as the reference code does.
    assert lr_factor(recipe, 5.0, 350) == pytest.approx(0.97 ** 2)
    assert lr_factor(recipe, 7.19, 350) == pytest.approx(0.97 ** 2)
    assert lr_factor(recipe, 7.2, 350) == pytest.approx(0.97 ** 3)
    assert lr_factor(recipe, 349.0, 350) == pytest.approx(0.97 ** 145)


def test_warmup_start_factor():
    recipe = Recipe(warmup_epochs=2, warmup_start_factor=0.1, schedule="constant")
    assert lr_factor(recipe, 0.0, 10) == pytest.approx(0.1)
    assert lr_factor(recipe, 1.0, 10) == pytest.approx(0.55)
    assert lr_factor(recipe, 2.0, 10) == 1.0


def test_cosine_anneals_over_the_epochs_after_warmup():
    recipe = Recipe(warmup_epochs=2, schedule="cosine", min_lr_factor=0.01)
    assert lr_factor(recipe, 1.0, 12) == pytest.approx(0.5)
    assert lr_factor(recipe, 2.0, 12) == pytest.approx(1.0)
    assert lr_factor(recipe, 7.0, 12) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(recipe, 12.0, 12) == pytest.approx(0.01)
    assert lr_factor(recipe, 20.0, 12) == pytest.approx(0.01)  # past the end: stays at the floor


def test_step_schedule_multiplies_at_each_milestone():
    recipe = Recipe(warmup_epochs=0, schedule="step", milestones=[60, 30], step_gamma=0.1)
    assert recipe.milestones == [30.0, 60.0]
    assert lr_factor(recipe, 29.99, 90) == 1.0
    assert lr_factor(recipe, 30.0, 90) == pytest.approx(0.1)
    assert lr_factor(recipe, 60.0, 90) == pytest.approx(0.01)


def test_scheduler_steps_per_optimizer_step_through_warmup_and_decay():
    recipe = Recipe(warmup_epochs=1, schedule="exponential_step", decay_rate=0.5, decay_epochs=2)
    model = nn.Linear(4, 2)
    optimizer = build_optimizer(recipe, model, lr=1.0)
    scheduler = build_scheduler(recipe, optimizer, steps_per_epoch=10, total_epochs=6)
    lrs = []
    for _ in range(45):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[9] == pytest.approx(0.9)
    assert lrs[10] == pytest.approx(1.0) and lrs[19] == pytest.approx(1.0)  # epoch 1.0 .. 1.9
    assert lrs[20] == pytest.approx(0.5) and lrs[39] == pytest.approx(0.5)  # epoch 2.0 .. 3.9
    assert lrs[40] == pytest.approx(0.25)
    # Every group follows the schedule (the no-decay group too).
    assert {g["lr"] for g in optimizer.param_groups} == {optimizer.param_groups[0]["lr"]}


def test_scheduler_state_is_plain_data_for_weights_only_checkpoints():
    recipe = Recipe()
    optimizer = build_optimizer(recipe, nn.Linear(4, 2), lr=0.1)
    scheduler = build_scheduler(recipe, optimizer, steps_per_epoch=7, total_epochs=3)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    buffer = io.BytesIO()
    torch.save(scheduler.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["last_epoch"] == 3


def test_no_weight_decay_on_norms_biases_and_routing_biases():
    model = condconv.create_model(condconv.ModelSpec(arch="mobilenet_v1", width_mult=0.25, num_experts=4,
                                                     resolution=32, num_classes=10))
    recipe = Recipe(weight_decay=1e-5)
    groups = param_groups(model, recipe)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(by_id) == len(names)  # every trainable parameter in exactly one group
    decay = {n for n, p in names.items() if by_id[id(p)] > 0}
    no_decay = set(names) - decay
    assert any(n.endswith("routing.fc.bias") for n in no_decay)
    assert any(n.endswith("routing.fc.weight") for n in decay)
    assert all(n.endswith(".bias") or names[n].ndim <= 1 for n in no_decay)
    assert any(".bn." in n for n in no_decay) and not any(".bn." in n for n in decay)
    assert any(names[n].ndim == 5 for n in decay)  # CondConv expert kernels [E, out, in, kh, kw]
    assert all(by_id[id(names[n])] == pytest.approx(1e-5) for n in decay)

    everything = param_groups(model, Recipe(weight_decay=1e-5, no_decay_norm_and_bias=False))
    assert len(everything) == 1 and everything[0]["weight_decay"] == 1e-5


def test_rmsprop_tf_is_the_reference_optimizer_with_eps_inside_the_sqrt():
    from timm.optim import RMSpropTF

    recipe = Recipe()  # defaults: the reference recipe
    weight = nn.Parameter(torch.tensor([1.0, -2.0]))
    model = nn.Module()
    model.weight = weight
    optimizer = build_optimizer(recipe, model, lr=0.1)
    assert isinstance(optimizer, RMSpropTF)
    group = optimizer.param_groups[0]
    assert (group["alpha"], group["momentum"], group["eps"]) == (0.9, 0.9, 1e-3)

    grad = torch.tensor([0.5, 3.0])
    weight.grad = grad.clone()
    optimizer.step()
    # TF RMSProp: mean square starts at 1; step = lr * g / sqrt(ms + eps) (eps inside the sqrt).
    grad_wd = grad + 1e-5 * torch.tensor([1.0, -2.0])  # L2 weight decay added to the gradient
    ms = 0.9 * 1.0 + 0.1 * grad_wd ** 2
    expected = torch.tensor([1.0, -2.0]) - 0.1 * grad_wd / torch.sqrt(ms + 1e-3)
    torch.testing.assert_close(weight.detach(), expected)
    torch_style = torch.tensor([1.0, -2.0]) - 0.1 * grad_wd / (torch.sqrt(0.1 * grad_wd ** 2) + 1e-3)
    assert not torch.allclose(weight.detach(), torch_style)


def test_sgd_and_adamw():
    model = nn.Linear(4, 2)
    sgd = build_optimizer(Recipe(optimizer="sgd", momentum=0.9), model, lr=0.1)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["nesterov"] is True and sgd.param_groups[0]["momentum"] == 0.9
    adamw = build_optimizer(Recipe(optimizer="adamw", weight_decay=0.05), model, lr=1e-3)
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["eps"] == 1e-8
    assert sorted(g["weight_decay"] for g in adamw.param_groups) == [0.0, 0.05]


@pytest.mark.parametrize("changes", [
    {"optimizer": "adam"}, {"schedule": "linear"}, {"lr": 0.0}, {"label_smoothing": 1.5},
    {"weight_decay": -1.0}, {"decay_epochs": 0.0},
])
def test_invalid_recipe_fields_raise(changes):
    with pytest.raises(ValueError, match=next(iter(changes))):
        Recipe(**changes)


def test_mixup_enabled():
    assert not Recipe().mixup_enabled
    assert Recipe(mixup_alpha=0.2).mixup_enabled and Recipe(cutmix_alpha=1.0).mixup_enabled
    assert math.isclose(Recipe(betas=[0.8, 0.9]).betas[0], 0.8)
