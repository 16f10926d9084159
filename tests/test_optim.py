"""Optimizers, gradient clipping and schedules: parity with PyTorch, state dicts, and training."""

from __future__ import annotations

import math

import numpy
import pytest
import torch

from mnn.errors import CheckpointError
from mnn.layers import Linear
from mnn.module import Sequential
from mnn.optim import SGD, Adam, AdamW, clip_grad_norm, param_groups
from mnn.optim.schedules import Constant, StepDecay, WarmupCosine, schedule_from_config

TOLERANCE = {numpy.float64: 1e-10, numpy.float32: 1e-6}
SHAPES = {"w1": (5, 4), "b1": (5,), "w2": (3, 5), "gain": (3,)}
STEPS = 4


def relative_error(ours, theirs) -> float:
    ours, theirs = numpy.asarray(ours, dtype=numpy.float64), numpy.asarray(theirs, dtype=numpy.float64)
    scale = numpy.linalg.norm(theirs)
    return float(numpy.linalg.norm(ours - theirs) / scale) if scale else float(numpy.linalg.norm(ours))


def make_problem(dtype, seed=0):
    """Parameters, zeroed gradient buffers and STEPS fixed random gradients per parameter."""
    rng = numpy.random.default_rng(seed)
    params = {name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()}
    grads = {name: numpy.zeros_like(p) for name, p in params.items()}
    schedule = [{name: rng.standard_normal(shape).astype(dtype) for name, shape in SHAPES.items()}
                for _ in range(STEPS)]
    return params, grads, schedule


def run_both(dtype, make_ours, make_theirs, groups=(("w1", "b1", "w2", "gain"),), group_options=None):
    """Take STEPS steps with mnn and torch from the same start and gradients; return both parameter sets."""
    params, grads, schedule = make_problem(dtype)
    torch_params = {name: torch.tensor(p.copy(), requires_grad=True) for name, p in params.items()}
    group_options = group_options or [{} for _ in groups]
    ours = make_ours([{"params": [(n, params[n], grads[n]) for n in names], **options}
                      for names, options in zip(groups, group_options)])
    theirs = make_theirs([{"params": [torch_params[n] for n in names], **options}
                          for names, options in zip(groups, group_options)])
    originals = {name: p for name, p in params.items()}
    for gradients in schedule:
        for name, g in gradients.items():
            grads[name][...] = g
            torch_params[name].grad = torch.tensor(g.copy())
        ours.step()
        theirs.step()
        ours.zero_grad()
    for name, p in params.items():
        assert p is originals[name], "the optimizer must update in place, never rebind"
        assert p.dtype == dtype
    return params, {name: t.detach().numpy() for name, t in torch_params.items()}, ours, theirs


def assert_parity(ours, theirs, dtype):
    for name in ours:
        error = relative_error(ours[name], theirs[name])
        assert error <= TOLERANCE[dtype], f"{name}: relative error {error:.3e}"


DTYPES = [numpy.float64, numpy.float32]


SGD_CONFIGS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.1, momentum=0.9),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.1, weight_decay=0.05),
    "momentum_decay_dampening": dict(lr=0.05, momentum=0.8, weight_decay=0.05, dampening=0.3),
    "nesterov_decay": dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.02),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", list(SGD_CONFIGS))
def test_sgd_matches_torch(config, dtype, compute_path):
    options = SGD_CONFIGS[config]
    ours, theirs, _, _ = run_both(dtype, lambda g: SGD(g, **options), lambda g: torch.optim.SGD(g, **options))
    assert_parity(ours, theirs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adam_matches_torch(weight_decay, dtype, compute_path):
    options = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    ours, theirs, optimizer, reference = run_both(
        dtype, lambda g: Adam(g, **options), lambda g: torch.optim.Adam(g, **options))
    assert_parity(ours, theirs, dtype)
    for name, t in zip(SHAPES, reference.param_groups[0]["params"]):
        for buffer in ("exp_avg", "exp_avg_sq"):
            error = relative_error(optimizer.state[name][buffer], reference.state[t][buffer].numpy())
            assert error <= TOLERANCE[dtype], f"{buffer}.{name}: relative error {error:.3e}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_adamw_two_groups_matches_torch(dtype, compute_path):
    groups = (("w1", "w2"), ("b1", "gain"))
    options = [{"weight_decay": 0.1}, {"weight_decay": 0.0, "lr": 0.02}]
    ours, theirs, optimizer, _ = run_both(
        dtype, lambda g: AdamW(g, lr=0.01, betas=(0.9, 0.95)),
        lambda g: torch.optim.AdamW(g, lr=0.01, betas=(0.9, 0.95)), groups, options)
    assert_parity(ours, theirs, dtype)
    assert [g["weight_decay"] for g in optimizer.groups] == [0.1, 0.0]
    assert [g["lr"] for g in optimizer.groups] == [0.01, 0.02]


def test_adamw_defaults_match_torch():
    ours, theirs, _, _ = run_both(numpy.float64, lambda g: AdamW(g), lambda g: torch.optim.AdamW(g))
    assert_parity(ours, theirs, numpy.float64)


def test_param_groups_is_the_nanogpt_split():
    model = Sequential(Linear(4, 5, rng=numpy.random.default_rng(0)), Linear(5, 3, rng=numpy.random.default_rng(1)))
    decay, no_decay = param_groups(model, weight_decay=0.1)
    assert [n for n, _, _ in decay["params"]] == ["0.weight", "1.weight"]
    assert [n for n, _, _ in no_decay["params"]] == ["0.bias", "1.bias"]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert decay["params"][0][1] is model[0].params["weight"] and decay["params"][0][2] is model[0].grads["weight"]
    optimizer = AdamW(param_groups(model, 0.1), lr=1e-3)
    assert sorted(optimizer.state) == sorted(n for n, _ in model.named_parameters())


def test_tied_weights_are_updated_once():
    first, second = Linear(3, 3, bias=False), Linear(3, 3, bias=False)
    second.tie_parameter("weight", first, "weight")
    model = Sequential(first, second)
    optimizer = SGD(model, lr=0.5)
    assert list(optimizer.state) == ["0.weight"]
    before = first.params["weight"].copy()
    first.grads["weight"][...] = 1.0
    optimizer.step()
    numpy.testing.assert_array_equal(second.params["weight"], before - 0.5)


def test_lr_property_sets_every_group_and_zero_grad_zeroes():
    params, grads, _ = make_problem(numpy.float32)
    optimizer = AdamW([{"params": [("w1", params["w1"], grads["w1"])], "lr": 0.5},
                       {"params": [("b1", params["b1"], grads["b1"])]}], lr=0.1)
    assert optimizer.lr == 0.5
    optimizer.lr = 0.25
    assert [g["lr"] for g in optimizer.groups] == [0.25, 0.25] and optimizer.lr == 0.25
    assert type(optimizer.lr) is float
    grads["w1"][...] = 3.0
    optimizer.zero_grad()
    assert not grads["w1"].any()


ZEROING = {"sgd": lambda g: SGD(g, lr=0.1), "momentum": lambda g: SGD(g, lr=0.1, momentum=0.9, weight_decay=0.01),
           "nesterov": lambda g: SGD(g, lr=0.1, momentum=0.9, nesterov=True),
           "adam": lambda g: Adam(g, lr=0.01, weight_decay=0.1), "adamw": lambda g: AdamW(g, lr=0.01)}


@pytest.mark.parametrize("kind", list(ZEROING))
def test_step_with_zero_grad_equals_step_then_zero_grad_bit_for_bit(kind, compute_path):
    """``step(zero_grad=True)`` (each run of gradients zeroed right after its update) gives the parameters and
    state of ``step()`` then ``zero_grad()``, and leaves every gradient zero; flattened runs included."""
    results = []
    for fused in (False, True):
        params, grads, schedule = make_problem(numpy.float32, seed=4)
        flat = numpy.zeros(sum(g.size for g in grads.values()), numpy.float32)  # gradients end to end: one run
        offset = 0
        for name, g in grads.items():
            grads[name] = flat[offset: offset + g.size].reshape(g.shape)
            offset += g.size
        optimizer = ZEROING[kind]([{"params": [(n, params[n], grads[n]) for n in SHAPES]}])
        for gradients in schedule:
            for name, g in gradients.items():
                grads[name] += g  # accumulates: a gradient left over would change the next step
            if fused:
                optimizer.step(zero_grad=True)
            else:
                optimizer.step()
                optimizer.zero_grad()
            assert not flat.any()
        results.append((params, optimizer.state_dict()))
    for name in SHAPES:
        assert numpy.array_equal(results[0][0][name], results[1][0][name]), name
    for key, value in results[0][1].items():
        assert numpy.array_equal(value, results[1][1][key]), key


def test_bad_configuration_is_refused():
    params, grads, _ = make_problem(numpy.float64)
    triples = [("w1", params["w1"], grads["w1"])]
    with pytest.raises(ValueError, match="unknown keys"):
        SGD([{"params": triples, "learning_rate": 0.1}], lr=0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        SGD([{"params": triples}], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="more than one place"):
        SGD([{"params": triples}, {"params": triples}], lr=0.1)
    with pytest.raises(ValueError, match="betas"):
        Adam([{"params": triples}], betas=(1.0, 0.9))
    with pytest.raises(ValueError):
        SGD([{"params": [("w1", params["w1"], grads["b1"])]}], lr=0.1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_float32_stays_float32_and_no_promotion(dtype, compute_path):
    params, grads, schedule = make_problem(dtype)
    groups = [{"params": [(n, params[n], grads[n]) for n in SHAPES]}]
    for optimizer in (SGD(groups, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
                      Adam(groups, weight_decay=0.1), AdamW(groups)):
        for gradients in schedule:
            for name, g in gradients.items():
                grads[name][...] = g
            optimizer.step()
        for name, p in params.items():
            assert p.dtype == dtype
            assert all(buffer.dtype == dtype for buffer in optimizer.state[name].values())


# -- state dicts ----------------------------------------------------------------

OPTIMIZERS = {
    "sgd_momentum": lambda g: SGD(g, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda g: Adam(g, lr=0.01, weight_decay=0.01),
    "adamw": lambda g: AdamW(g, lr=0.01),
}


def groups_of(params, grads):
    return [{"params": [(n, params[n], grads[n]) for n in ("w1", "w2")], "weight_decay": 0.1},
            {"params": [(n, params[n], grads[n]) for n in ("b1", "gain")], "weight_decay": 0.0}]


def take_steps(optimizer, grads, gradients_list):
    for gradients in gradients_list:
        for name, g in gradients.items():
            grads[name][...] = g
        optimizer.step()


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_state_dict_round_trip_is_bitwise(kind, compute_path, tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    rng = numpy.random.default_rng(7)
    params, grads, _ = make_problem(numpy.float32)
    gradients = [{n: rng.standard_normal(s).astype(numpy.float32) for n, s in SHAPES.items()} for _ in range(5)]
    optimizer = OPTIMIZERS[kind](groups_of(params, grads))
    take_steps(optimizer, grads, gradients[:3])
    saved_params = {n: p.copy() for n, p in params.items()}
    path = tmp_path / "optimizer.safetensors"
    safetensors_numpy.save_file(optimizer.state_dict(), str(path))
    take_steps(optimizer, grads, gradients[3:])

    copies = {n: p.copy() for n, p in saved_params.items()}
    copy_grads = {n: numpy.zeros_like(p) for n, p in copies.items()}
    restored = OPTIMIZERS[kind](groups_of(copies, copy_grads))
    restored.load_state_dict(safetensors_numpy.load_file(str(path)))
    assert restored.step_count == 3
    take_steps(restored, copy_grads, gradients[3:])
    for name in params:
        numpy.testing.assert_array_equal(copies[name], params[name])
    for key, value in optimizer.state_dict().items():
        numpy.testing.assert_array_equal(restored.state_dict()[key], value)


def test_state_dict_keys_and_copies():
    params, grads, schedule = make_problem(numpy.float32)
    optimizer = AdamW(groups_of(params, grads))
    take_steps(optimizer, grads, schedule[:1])
    state = optimizer.state_dict()
    assert sorted(state) == sorted(["step"] + [f"{b}.{n}" for n in SHAPES for b in ("exp_avg", "exp_avg_sq")])
    assert state["step"].dtype == numpy.int64 and int(state["step"]) == 1
    before = state["exp_avg.w1"].copy()
    take_steps(optimizer, grads, schedule[1:2])
    numpy.testing.assert_array_equal(state["exp_avg.w1"], before)  # a snapshot, not a live view
    assert sorted(SGD(groups_of(params, grads), lr=0.1, momentum=0.9).state_dict()) == sorted(
        ["step"] + [f"momentum.{n}" for n in SHAPES])
    assert list(SGD(groups_of(params, grads), lr=0.1).state_dict()) == ["step"]


def test_load_state_dict_refuses_bad_states_and_changes_nothing():
    params, grads, schedule = make_problem(numpy.float64)
    optimizer = Adam(groups_of(params, grads))
    take_steps(optimizer, grads, schedule[:2])
    good = optimizer.state_dict()
    before = optimizer.state_dict()

    bad = dict(good)
    del bad["exp_avg.w1"]
    bad["exp_avg_sq.b1"] = numpy.zeros(7)
    bad["momentum.w1"] = numpy.zeros((5, 4))
    bad["exp_avg.gain"] = numpy.ones(3)  # valid, must not be applied
    with pytest.raises(CheckpointError) as info:
        optimizer.load_state_dict(bad)
    message = str(info.value)
    assert "missing exp_avg.w1" in message
    assert "unexpected momentum.w1" in message
    assert "exp_avg_sq.b1: expected (5,), got (7,)" in message

    for step in (numpy.array(1.5), numpy.array([1, 2], dtype=numpy.int64), numpy.array(-1, dtype=numpy.int64)):
        with pytest.raises(CheckpointError, match="step"):
            optimizer.load_state_dict({**good, "step": step})
    without_step = dict(good)
    del without_step["step"]
    with pytest.raises(CheckpointError, match="missing step"):
        optimizer.load_state_dict(without_step)

    assert optimizer.step_count == 2
    for key, value in optimizer.state_dict().items():
        numpy.testing.assert_array_equal(value, before[key])
    optimizer.load_state_dict({**good, "step": numpy.array([5], dtype=numpy.int64)})
    assert optimizer.step_count == 5


# -- clipping -------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_matches_torch(max_norm, dtype):
    _, _, schedule = make_problem(dtype, seed=3)
    grads = schedule[0]
    tensors = [torch.tensor(g.copy(), requires_grad=True) for g in grads.values()]
    for t, g in zip(tensors, grads.values()):
        t.grad = torch.tensor(g.copy())
    expected = float(torch.nn.utils.clip_grad_norm_(tensors, max_norm))
    originals = list(grads.values())
    norm = clip_grad_norm(list(grads.items()), max_norm)  # (name, grad) pairs
    assert type(norm) is float
    assert abs(norm - expected) <= TOLERANCE[dtype] * expected
    for g, t in zip(grads.values(), tensors):
        assert relative_error(g, t.grad.numpy()) <= TOLERANCE[dtype]
        assert g.dtype == dtype
    assert all(a is b for a, b in zip(grads.values(), originals))
    if max_norm < norm:
        assert abs(clip_grad_norm(grads.values(), max_norm) - max_norm) < 1e-5  # plain arrays; now clipped


def test_clip_grad_norm_leaves_non_finite_gradients_alone():
    grads = [numpy.array([3.0, 4.0], dtype=numpy.float32), numpy.array([numpy.inf], dtype=numpy.float32)]
    assert clip_grad_norm(grads, 1.0) == math.inf
    numpy.testing.assert_array_equal(grads[0], [3.0, 4.0])
    grads[1][0] = numpy.nan
    assert math.isnan(clip_grad_norm(grads, 1.0))
    numpy.testing.assert_array_equal(grads[0], [3.0, 4.0])
    with pytest.raises(ValueError):
        clip_grad_norm(grads, 0.0)


# -- schedules ------------------------------------------------------------------

def nanogpt_get_lr(it, learning_rate, min_lr, warmup_iters, lr_decay_iters):
    """nanoGPT's train.py get_lr, written out again as the reference."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    assert 0 <= decay_ratio <= 1
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("warmup, decay", [(100, 5000), (0, 10), (7, 8)])
def test_warmup_cosine_matches_nanogpt(warmup, decay):
    schedule = WarmupCosine(max_lr=6e-4, min_lr=6e-5, warmup_steps=warmup, decay_steps=decay)
    for step in list(range(0, decay + 20)) + [10 * decay, 10**7]:
        assert schedule(step) == nanogpt_get_lr(step, 6e-4, 6e-5, warmup, decay), step
        assert schedule.lr_at(step) == schedule(step)
    assert schedule(warmup) == 6e-4 and schedule(decay) == pytest.approx(6e-5, abs=1e-18)


def test_warmup_cosine_longer_than_the_run():
    """decay_steps <= warmup_steps (a short run): nanoGPT's formula where it is defined, the floor after."""
    for warmup, decay in [(10, 10), (10, 4)]:
        schedule = WarmupCosine(1.0, 0.1, warmup_steps=warmup, decay_steps=decay)
        assert [schedule(t) for t in range(warmup)] == [(t + 1) / (warmup + 1) for t in range(warmup)]
        assert schedule(warmup) == schedule(warmup + 5) == 0.1


def test_step_decay_and_constant():
    schedule = StepDecay(0.1, step_size=3, gamma=0.5)
    assert [schedule(t) for t in range(7)] == [0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.025]
    reference_params = [torch.zeros(1, requires_grad=True)]
    reference = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(reference_params, lr=0.1), step_size=3, gamma=0.5)
    for t in range(10):
        assert schedule(t) == pytest.approx(reference.get_last_lr()[0], rel=1e-12)
        reference.optimizer.step()
        reference.step()
    assert Constant(0.3)(12345) == 0.3


@pytest.mark.parametrize("schedule", [Constant(0.1), StepDecay(0.1, 10, 0.9), WarmupCosine(1e-3, 1e-4, 10, 100)])
def test_schedule_config_round_trip(schedule):
    import json

    config = json.loads(json.dumps(schedule.config()))
    rebuilt = schedule_from_config(config)
    assert type(rebuilt) is type(schedule) and rebuilt.config() == schedule.config()
    assert [rebuilt(t) for t in range(0, 200, 7)] == [schedule(t) for t in range(0, 200, 7)]


def test_schedule_errors():
    with pytest.raises(CheckpointError, match="unknown"):
        schedule_from_config({"name": "Linear", "lr": 0.1})
    with pytest.raises(CheckpointError, match="WarmupCosine"):
        schedule_from_config({"name": "WarmupCosine", "max_lr": 1.0})
    with pytest.raises(ValueError):
        WarmupCosine(1.0, 0.1, warmup_steps=-1, decay_steps=10)
    with pytest.raises(ValueError):
        Constant(0.1)(-1)


# -- training -------------------------------------------------------------------

@pytest.mark.parametrize("make_optimizer", [
    lambda model: SGD(model, lr=0.1, momentum=0.9),
    lambda model: Adam(model, lr=0.05),
    lambda model: AdamW(param_groups(model, 0.01), lr=0.05),
], ids=["sgd", "adam", "adamw"])
def test_optimizers_minimise_least_squares(make_optimizer, compute_path):
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(numpy.float32)
    true_w, true_b = rng.standard_normal((3, 8)), rng.standard_normal(3)
    target = (x @ true_w.T + true_b).astype(numpy.float32)
    model = Linear(8, 3, rng=rng)
    optimizer = make_optimizer(model)

    def loss_and_backward():
        y = model(x)
        residual = y - target
        model.backward((2.0 / residual.size) * residual)
        return float((residual**2).mean())

    optimizer.zero_grad()
    first = loss_and_backward()
    for _ in range(200):
        optimizer.step()
        optimizer.zero_grad()
        last = loss_and_backward()
    assert model.params["weight"].dtype == numpy.float32
    assert last < first / 10, (first, last)



@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_moments_of_a_silent_gradient_flush_to_zero_and_move_no_parameter(kind, compute_path):
    """A gradient that falls silent leaves its moments decaying into the subnormal range: mnn sets them to
    zero (flush_subnormal), PyTorch keeps them, and no parameter moves differently."""
    start = numpy.array([0.75, -2.5, 1e-3, 3.0], dtype=numpy.float32)
    param, grad = start.copy(), numpy.zeros_like(start)
    tensor = torch.tensor(start.copy(), requires_grad=True)
    if kind == "sgd":
        ours = SGD([{"params": [("w", param, grad)]}], lr=0.1, momentum=0.5)
        theirs, names = torch.optim.SGD([tensor], lr=0.1, momentum=0.5), [("momentum", "momentum_buffer")]
    else:
        ours = Adam([{"params": [("w", param, grad)]}], lr=0.1, betas=(0.5, 0.6))
        theirs, names = torch.optim.Adam([tensor], lr=0.1, betas=(0.5, 0.6)), [("exp_avg",) * 2, ("exp_avg_sq",) * 2]
    first = numpy.array([1.0, -2.0, 0.5, 4.0], dtype=numpy.float32)
    for step in range(140):  # 0.5**k passes 2**-126 (float32's smallest normal) after about 127 silent steps
        value = first if step == 0 else numpy.zeros_like(first)
        grad[...] = value
        tensor.grad = torch.tensor(value)
        ours.step()
        theirs.step()
    tiny = numpy.finfo(numpy.float32).tiny
    for own, other in names:
        mine, reference = ours.state["w"][own], theirs.state[tensor][other].numpy()
        subnormal = (reference != 0) & (numpy.abs(reference) < tiny)
        assert subnormal.all() == (own != "exp_avg_sq"), own  # v decays more slowly: still normal here
        assert not mine[subnormal].any(), own
        numpy.testing.assert_allclose(mine[~subnormal], reference[~subnormal], rtol=1e-5, err_msg=own)
    assert numpy.array_equal(param, tensor.detach().numpy())
