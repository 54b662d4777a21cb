"""AdamW, schedules and clipping against independent oracles.

Oracles: a NumPy transcription of the published AdamW rule (Loshchilov &
Hutter 2019, Algorithm 2, written here, not imported), torch.optim.AdamW and
torch.nn.utils.clip_grad_norm_ (reference extra; skipped without torch), and
hand-computed schedule values. Resume is checked bit for bit.
"""

import json
import math

import numpy as np
import pytest
from helpers import F64_TOL, assert_close
from tinylora.errors import TinyloraError
from tinylora.optim import STATE_SCALARS, STATE_TENSORS, AdamW, LRSchedule, clip_grad_norm, lr_at, scale_grads
from tinylora.tensor import Tensor

# float32 AdamW vs torch's float32 AdamW: both round each operation to float32,
# in slightly different orders; after a few steps that is a few ulp of θ.
TORCH_F32_RTOL = 1e-6
# float64 vs float64: the same formula up to the order of a few roundings.
TORCH_F64_RTOL = 1e-12

SHAPES = [("a.lora_A.weight", (4, 8)), ("a.lora_B.weight", (8, 4)), ("b.lora_A.weight", (16,))]
LRS = [1e-2, 3e-2, 5e-3, 2e-2, 1e-2, 7e-3]         # a changing learning rate, one per step


def make_params(dtype, seed=0):
    rng = np.random.default_rng(seed)
    return [(name, Tensor(rng.standard_normal(shape).astype(dtype), requires_grad=True)) for name, shape in SHAPES]


def make_grads(n_steps, dtype, seed=1):
    """n_steps lists of gradients, one per parameter, of varied scale (some near ε)."""
    rng = np.random.default_rng(seed)
    return [[(rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 2)).astype(dtype) for _, shape in SHAPES]
            for _ in range(n_steps)]


def run_ours(params, grads, lrs, **hyper):
    opt = AdamW(params, lr=lrs[0], **hyper)
    for step_grads, lr in zip(grads, lrs):
        for (_, p), g in zip(params, step_grads):
            p.grad = None if g is None else g.copy()
        opt.step(lr=lr)
    return opt


# --------------------------------------------------------------------------
# The published rule
# --------------------------------------------------------------------------

def adamw_reference(theta, grads, alpha, etas, beta1, beta2, eps, lam):
    """Loshchilov & Hutter 2019, Algorithm 2 ("Adam with decoupled weight decay"), float64, verbatim:

        m_t = β1 m_{t-1} + (1 - β1) g_t
        v_t = β2 v_{t-1} + (1 - β2) g_t²
        m̂_t = m_t / (1 - β1^t),  v̂_t = v_t / (1 - β2^t)
        θ_t = θ_{t-1} - η_t (α m̂_t / (√v̂_t + ε) + λ θ_{t-1})
    """
    theta = np.array(theta, dtype=np.float64)
    m = np.zeros_like(theta)
    v = np.zeros_like(theta)
    for t, (g, eta) in enumerate(zip(grads, etas), start=1):
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g ** 2
        m_hat = m / (1 - beta1 ** t)
        v_hat = v / (1 - beta2 ** t)
        theta = theta - eta * (alpha * m_hat / (np.sqrt(v_hat) + eps) + lam * theta)
    return theta


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adamw_matches_published_rule(dtype):
    params, grads = make_params(dtype), make_grads(len(LRS), dtype)
    initial = [p.data.astype(np.float64) for _, p in params]
    wd = 0.1
    run_ours(params, grads, LRS, betas=(0.9, 0.99), eps=1e-8, weight_decay=wd)
    # torch's convention: lr_t = α·η_t and decay lr_t·wd, so with α = LRS[0]: η_t = lr_t/α, λ = α·wd.
    alpha = LRS[0]
    etas = [lr / alpha for lr in LRS]
    tol = F64_TOL if dtype == np.float64 else TORCH_F32_RTOL
    for i, (name, p) in enumerate(params):
        assert p.data.dtype == dtype
        expected = adamw_reference(initial[i], [g[i].astype(np.float64) for g in grads],
                                   alpha, etas, 0.9, 0.99, 1e-8, alpha * wd)
        assert_close(p.data, expected, tol, what=name)


def test_step_is_in_place_and_zero_grad_clears():
    params = make_params(np.float32)
    arrays = [p.data for _, p in params]
    opt = run_ours(params, make_grads(1, np.float32), [1e-2])
    assert all(p.data is a for (_, p), a in zip(params, arrays)), "the model holds these arrays: update in place"
    opt.zero_grad()
    assert all(p.grad is None for _, p in params)


def test_skipped_parameter_keeps_its_own_step_count():
    params, grads = make_params(np.float64), make_grads(4, np.float64)
    grads[1][0] = None                                  # parameter 0 gets no gradient at step 2
    before = params[0][1].data.copy()
    opt = AdamW(params, lr=1e-2, weight_decay=0.1)
    for i, step_grads in enumerate(grads):
        for (_, p), g in zip(params, step_grads):
            p.grad = None if g is None else g.copy()
        opt.step()
        if i == 1:
            after_skip = params[0][1].data.copy()
        if i == 0:
            after_first = params[0][1].data.copy()
    assert not np.array_equal(before, after_first)
    assert np.array_equal(after_first, after_skip), "a parameter without gradient must not move, not even by decay"
    assert opt.steps == {"a.lora_A.weight": 3, "a.lora_B.weight": 4, "b.lora_A.weight": 4}
    # and its bias correction counts 3 updates: the reference over its own 3 gradients
    ours = params[0][1].data
    expected = adamw_reference(before, [grads[0][0], grads[2][0], grads[3][0]], 1e-2, [1, 1, 1], 0.9, 0.999,
                               1e-8, 1e-2 * 0.1)
    assert_close(ours, expected, F64_TOL, what="skipped parameter")


# --------------------------------------------------------------------------
# torch.optim.AdamW
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype, rtol", [(np.float32, TORCH_F32_RTOL), (np.float64, TORCH_F64_RTOL)])
def test_adamw_matches_torch(dtype, rtol):
    torch = pytest.importorskip("torch")
    params, grads = make_params(dtype), make_grads(len(LRS), dtype)
    grads[2][1] = None                                  # torch skips it too, and keeps per-parameter steps
    torch_params = [torch.nn.Parameter(torch.from_numpy(p.data.copy())) for _, p in params]
    torch_opt = torch.optim.AdamW(torch_params, lr=LRS[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    for step_grads, lr in zip(grads, LRS):
        for tp, g in zip(torch_params, step_grads):
            tp.grad = None if g is None else torch.from_numpy(g.copy())
        torch_opt.param_groups[0]["lr"] = lr
        torch_opt.step()
    opt = run_ours(params, grads, LRS, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)

    for (name, p), tp in zip(params, torch_params):
        assert_close(p.data, tp.detach().numpy(), rtol, what=name)
        state = torch_opt.state[tp]
        assert opt.steps[name] == int(state["step"])
        assert_close(opt.exp_avg[name], state["exp_avg"].numpy(), rtol, what=f"{name} m")
        assert_close(opt.exp_avg_sq[name], state["exp_avg_sq"].numpy(), rtol, what=f"{name} v")


# --------------------------------------------------------------------------
# Schedules: 1-based update numbers, warm-up from 0 at t = 0
# --------------------------------------------------------------------------

def test_schedule_values_at_key_steps():
    base, total, warmup = 1e-3, 110, 10
    cosine = LRSchedule(base, total, "cosine", warmup=warmup, min_lr_ratio=0.1)
    assert cosine(0) == 0.0
    assert cosine(1) == pytest.approx(base / 10, rel=1e-15)                    # first update: base/warmup
    assert cosine(5) == pytest.approx(base / 2, rel=1e-15)
    assert cosine(warmup) == pytest.approx(base, rel=1e-15)                    # end of warm-up: exactly base
    assert cosine(60) == pytest.approx(0.55e-3, rel=1e-12)                     # halfway through decay: mid of base, floor
    assert cosine(85) == pytest.approx(1e-4 + 9e-4 * 0.5 * (1 + math.cos(0.75 * math.pi)), rel=1e-12)
    assert cosine(total) == pytest.approx(1e-4, rel=1e-12)                     # last update: the floor
    assert cosine(total + 50) == pytest.approx(1e-4, rel=1e-12)                # and it stays there

    linear = LRSchedule(base, total, "linear", warmup=warmup)
    assert linear(60) == pytest.approx(base / 2, rel=1e-12)
    assert linear(total) == 0.0

    constant = LRSchedule(base, total, "constant", warmup=warmup)
    assert constant(5) == pytest.approx(base / 2, rel=1e-15)
    assert [constant(t) for t in (warmup, 60, total)] == [base] * 3


def test_schedule_edge_cases():
    assert lr_at(1, 2e-4, 100, "cosine") == pytest.approx(2e-4 * 0.5 * (1 + math.cos(math.pi / 100)))
    assert lr_at(1, 2e-4, 1, "cosine", warmup=1) == 2e-4         # warm-up == total: rises, never decays
    assert lr_at(7, 2e-4, 10, "constant") == 2e-4
    values = [lr_at(t, 1.0, 50, "cosine", warmup=5) for t in range(1, 51)]
    assert values.index(max(values)) == 4 and all(a >= b for a, b in zip(values[4:], values[5:]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(base_lr=0.0), "learning rate"),
    (dict(base_lr=-1e-3), "learning rate"),
    (dict(base_lr=float("nan")), "learning rate"),
    (dict(warmup=101), "warm-up"),
    (dict(warmup=-1), "warm-up"),
    (dict(total_steps=0), "total steps"),
    (dict(schedule="exponential"), "unknown learning-rate schedule 'exponential'"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio"),
])
def test_schedule_errors(kwargs, message):
    args = dict(base_lr=1e-3, total_steps=100, schedule="cosine", warmup=0, min_lr_ratio=0.0) | kwargs
    with pytest.raises(TinyloraError, match=message):
        LRSchedule(**args)
    with pytest.raises(TinyloraError, match="step must be >= 0"):
        LRSchedule(1e-3, 10)(-1)


# --------------------------------------------------------------------------
# Clipping and scaling
# --------------------------------------------------------------------------

def grads_of(params):
    return [None if p.grad is None else p.grad.copy() for _, p in params]


def test_clip_grad_norm_manual():
    params = make_params(np.float32)
    rng = np.random.default_rng(2)
    for _, p in params[:2]:
        p.grad = rng.standard_normal(p.shape).astype(np.float32)
    before = grads_of(params)                          # the third has no gradient: skipped
    expected_norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in before[:2]))

    assert clip_grad_norm(params, expected_norm * 2) == pytest.approx(expected_norm, rel=1e-12)
    assert all(np.array_equal(a, p.grad) for a, (_, p) in zip(before[:2], params))   # under the limit: untouched

    norm = clip_grad_norm(params, 1.0)
    assert norm == pytest.approx(expected_norm, rel=1e-12)
    for g0, (name, p) in zip(before[:2], params):
        assert p.grad.dtype == np.float32
        assert_close(p.grad, g0 * (1.0 / (expected_norm + 1e-6)), 1e-6, what=name)
    new_norm = math.sqrt(sum(float(np.sum(p.grad.astype(np.float64) ** 2)) for _, p in params[:2]))
    assert new_norm == pytest.approx(1.0, rel=1e-5)
    assert params[2][1].grad is None


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_clip_grad_norm_nonfinite_is_returned_unscaled(bad):
    params = make_params(np.float64)
    for _, p in params:
        p.grad = np.ones(p.shape)
    params[1][1].grad[0, 0] = bad
    before = grads_of(params)
    norm = clip_grad_norm(params, 1.0)
    assert not math.isfinite(norm) and (math.isnan(norm) if np.isnan(bad) else norm == math.inf)
    for g0, (_, p) in zip(before, params):
        np.testing.assert_array_equal(p.grad, g0)


def test_clip_grad_norm_matches_torch():
    torch = pytest.importorskip("torch")
    for dtype in (np.float32, np.float64):
        params = make_params(dtype)
        rng = np.random.default_rng(3)
        for _, p in params:
            p.grad = (rng.standard_normal(p.shape) * 3).astype(dtype)
        torch_params = [torch.nn.Parameter(torch.from_numpy(p.data.copy())) for _, p in params]
        for tp, (_, p) in zip(torch_params, params):
            tp.grad = torch.from_numpy(p.grad.copy())
        torch_norm = float(torch.nn.utils.clip_grad_norm_(torch_params, max_norm=0.5))
        norm = clip_grad_norm(params, 0.5)
        rtol = TORCH_F32_RTOL if dtype == np.float32 else TORCH_F64_RTOL
        assert norm == pytest.approx(torch_norm, rel=rtol)
        for (name, p), tp in zip(params, torch_params):
            assert_close(p.grad, tp.grad.numpy(), rtol, what=f"{name} clipped grad")


def test_scale_grads_averages_accumulated_grads():
    params = make_params(np.float32)
    g1, g2 = make_grads(2, np.float32)
    for (_, p), a, b in zip(params, g1, g2):
        p.grad = a + b                                 # what two backward calls leave
    params[2][1].grad = None
    scale_grads(params, 0.5)
    for (name, p), a, b in zip(params[:2], g1, g2):
        assert p.grad.dtype == np.float32
        assert_close(p.grad, (a + b) * np.float32(0.5), 0.0, what=name)
    assert params[2][1].grad is None


def test_clip_errors():
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(TinyloraError, match="max norm"):
            clip_grad_norm(make_params(np.float32), bad)


# --------------------------------------------------------------------------
# State: exact resume through files
# --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_resume_through_files_is_bit_identical(tmp_path, dtype):
    grads = make_grads(6, dtype)
    grads[1][2] = None                                  # uneven per-parameter step counts survive the round trip
    straight = make_params(dtype)
    opt = run_ours(straight, grads[:3], LRS[:3], weight_decay=0.01)
    opt.save(tmp_path)
    saved_values = [p.data.copy() for _, p in straight]   # (the trainer saves these as the adapter)
    for step_grads, lr in zip(grads[3:], LRS[3:]):
        for (_, p), g in zip(straight, step_grads):
            p.grad = g.copy()
        opt.step(lr=lr)

    resumed = [(name, Tensor(values.copy(), requires_grad=True)) for (name, _), values in zip(straight, saved_values)]
    opt2 = AdamW(resumed, lr=1.0, weight_decay=0.5)      # wrong hyper-parameters: the file's replace them
    opt2.load(tmp_path)
    assert (opt2.lr, opt2.weight_decay, opt2.betas, opt2.eps) == (LRS[0], 0.01, (0.9, 0.999), 1e-8)
    for step_grads, lr in zip(grads[3:], LRS[3:]):
        for (_, p), g in zip(resumed, step_grads):
            p.grad = g.copy()
        opt2.step(lr=lr)
    for (name, a), (_, b) in zip(straight, resumed):
        assert a.data.dtype == b.data.dtype == dtype
        assert np.array_equal(a.data, b.data), f"{name}: resumed run differs from the uninterrupted one"
    assert opt2.steps == opt.steps
    scalars = json.loads((tmp_path / STATE_SCALARS).read_text())
    assert scalars["steps"]["b.lora_A.weight"] == 2


def test_state_dict_is_a_copy():
    params = make_params(np.float64)
    opt = run_ours(params, make_grads(1, np.float64), [1e-2])
    tensors, scalars = opt.state_dict()
    before = {k: v.copy() for k, v in tensors.items()}
    run_more = make_grads(1, np.float64, seed=9)[0]
    for (_, p), g in zip(params, run_more):
        p.grad = g
    opt.step()
    assert all(np.array_equal(before[k], tensors[k]) for k in tensors)
    json.dumps(scalars)                                 # JSON-able as is


def test_load_state_errors(tmp_path):
    opt = run_ours(make_params(np.float32), make_grads(2, np.float32), [1e-2, 1e-2])
    tensors, scalars = opt.state_dict()

    def fresh():
        return AdamW(make_params(np.float32), lr=1e-3)

    with pytest.raises(TinyloraError, match=r"tensor a.lora_B.weight.exp_avg_sq has shape \(4, 4\), expected \(8, 4\)"):
        fresh().load_state_dict(tensors | {"a.lora_B.weight.exp_avg_sq": np.zeros((4, 4))}, scalars)
    with pytest.raises(TinyloraError, match="missing tensor b.lora_A.weight.exp_avg"):
        fresh().load_state_dict({k: v for k, v in tensors.items() if k != "b.lora_A.weight.exp_avg"}, scalars)
    with pytest.raises(TinyloraError, match="unexpected tensor c.exp_avg: not a parameter being trained"):
        fresh().load_state_dict(tensors | {"c.exp_avg": np.zeros(3)}, scalars)
    with pytest.raises(TinyloraError, match="unexpected step count for c.lora_A.weight: not a parameter being trained"):
        fresh().load_state_dict(tensors, scalars | {"steps": scalars["steps"] | {"c.lora_A.weight": 1}})
    missing = {k: v for k, v in scalars["steps"].items() if k != "a.lora_A.weight"}
    with pytest.raises(TinyloraError, match="missing step count for a.lora_A.weight"):
        fresh().load_state_dict(tensors, scalars | {"steps": missing})
    with pytest.raises(TinyloraError, match="missing 'eps'"):
        fresh().load_state_dict(tensors, {k: v for k, v in scalars.items() if k != "eps"})
    with pytest.raises(TinyloraError, match="betas must be two numbers"):
        fresh().load_state_dict(tensors, scalars | {"betas": [0.9]})
    with pytest.raises(TinyloraError, match="learning rate must be a finite number >= 0, got 'fast'"):
        fresh().load_state_dict(tensors, scalars | {"lr": "fast"})
    with pytest.raises(TinyloraError, match="step count of 'a.lora_A.weight' is 1.5"):
        fresh().load_state_dict(tensors, scalars | {"steps": scalars["steps"] | {"a.lora_A.weight": 1.5}})
    # a failed load changes nothing
    untouched = fresh()
    with pytest.raises(TinyloraError):
        untouched.load_state_dict(tensors, scalars | {"betas": [0.9]})
    assert untouched.steps["a.lora_A.weight"] == 0 and untouched.lr == 1e-3

    # files: missing, and a pair from two different saves
    with pytest.raises(TinyloraError, match="file not found"):
        fresh().load(tmp_path / "nowhere")
    opt.save(tmp_path / "one")
    for _, p in opt.params:
        p.grad = np.ones(p.shape, dtype=np.float32)
    opt.step()
    opt.save(tmp_path / "two")
    (tmp_path / "one" / STATE_SCALARS).write_bytes((tmp_path / "two" / STATE_SCALARS).read_bytes())
    with pytest.raises(TinyloraError, match="come from different saves"):
        fresh().load(tmp_path / "one")
    assert (tmp_path / "two" / STATE_TENSORS).exists()


def test_adamw_argument_errors():
    params = make_params(np.float32)
    with pytest.raises(TinyloraError, match="no parameters to train"):
        AdamW([], lr=1e-3)
    with pytest.raises(TinyloraError, match="appears twice"):
        AdamW(params + params[:1], lr=1e-3)
    with pytest.raises(TinyloraError, match="must be floating point"):
        AdamW([("ids", Tensor(np.arange(3)))], lr=1e-3)
    for kwargs, message in [(dict(lr=-1.0), "learning rate"), (dict(lr=1e-3, betas=(0.9, 1.0)), "betas"),
                            (dict(lr=1e-3, eps=-1.0), "eps"), (dict(lr=1e-3, weight_decay=-0.1), "weight_decay")]:
        with pytest.raises(TinyloraError, match=message):
            AdamW(params, **kwargs)
    opt = AdamW(params, lr=1e-3)
    with pytest.raises(TinyloraError, match="learning rate"):
        opt.step(lr=float("nan"))
    params[0][1].grad = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(TinyloraError, match="gradient of 'a.lora_A.weight' has shape"):
        opt.step()
