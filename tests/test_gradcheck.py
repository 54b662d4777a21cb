"""The gradient checker itself: it passes right gradients and fails wrong ones."""

import numpy as np
import pytest

import tinylora as tl
from tinylora.tensor import Function, Tensor


class MatMulWrong(Function):
    """y = a @ b with a deliberately wrong backward, chosen by `mistake`."""

    def forward(self, a, b, *, mistake):
        self.save_for_backward(a, b, mistake)
        return a @ b

    def backward(self, dy):
        a, b, mistake = self.saved
        da, db = dy @ b.T, a.T @ dy
        if mistake == "scaled":
            da = da * 1.001                   # 0.1 % off: far above 1e-6
        elif mistake == "transposed-input":   # a classic: the right numbers in the wrong places
            da = (dy @ b.T)[::-1]
        elif mistake == "one-entry":
            db = db.copy()
            db[1, 2] += 1e-3
        return da, db


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    return [Tensor(rng.standard_normal((4, 3)), requires_grad=True),
            Tensor(rng.standard_normal((3, 5)), requires_grad=True)]


def test_correct_backward_passes():
    result = tl.gradcheck(lambda a, b: MatMulWrong.apply(a, b, mistake=None), _inputs(), names=["a", "b"])
    assert result.ok, result.table()
    assert result.max_rel_error < 1e-8
    assert len(result.checks) == 12 + 12 + 1        # sampled entries of a (all 12), of b (12 of 15), a direction


@pytest.mark.parametrize("mistake", ["scaled", "transposed-input", "one-entry"])
def test_wrong_backward_fails(mistake):
    # "one-entry" may be missed by the sampled entries, never by the random direction.
    result = tl.gradcheck(lambda a, b: MatMulWrong.apply(a, b, mistake=mistake), _inputs(), names=["a", "b"])
    assert not result.ok
    assert result.max_rel_error > 1e-5
    assert "FAIL" in result.table()


def test_direction_check_sees_unsampled_entries():
    # entries=1 samples a single entry of each input; a wrong db[1, 2] is then caught by the direction row.
    result = tl.gradcheck(lambda a, b: MatMulWrong.apply(a, b, mistake="one-entry"), _inputs(), entries=1)
    direction = [c for c in result.checks if c.name == "direction"][0]
    assert direction.rel_error > 1e-6


def test_float32_inputs_are_refused():
    x = Tensor(np.ones((2, 2), dtype=np.float32), requires_grad=True)
    with pytest.raises(ValueError, match="float64"):
        tl.gradcheck(lambda x: x * x, [x])


def test_no_trainable_input_is_refused():
    with pytest.raises(ValueError, match="no input requires grad"):
        tl.gradcheck(lambda x: x * x, [Tensor(np.ones(2))])


def test_inputs_are_restored_exactly():
    inputs = _inputs()
    before = [t.data.copy() for t in inputs]
    tl.gradcheck(lambda a, b: a @ b, inputs)
    for t, b in zip(inputs, before):
        np.testing.assert_array_equal(t.data, b)


def test_table_names_each_check():
    result = tl.gradcheck(lambda a, b: a @ b, _inputs(), names=["A", "B"])
    table = result.table("matmul")
    assert table.splitlines()[0] == "matmul"
    assert "A[0,0]" in table and "direction" in table and table.rstrip().endswith("ok")
