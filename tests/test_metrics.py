import numpy as np
import pytest
import torch

from crformer.metrics import METRIC_KEYS, RISMetrics, format_table, intersection_union

KEYS = ["oIoU", "mIoU", "Prec@0.5", "Prec@0.6", "Prec@0.7", "Prec@0.8", "Prec@0.9", "n"]


def mask(h, w, cells):
    m = np.zeros((h, w), dtype=bool)
    for y, x in cells:
        m[y, x] = True
    return m


def first_k(k, size=10):
    m = np.zeros(size, dtype=bool)
    m[:k] = True
    return m


def test_keys_exact():
    m = RISMetrics()
    m.update(first_k(3), first_k(3))
    assert list(m.compute().keys()) == KEYS
    assert tuple(METRIC_KEYS) == tuple(KEYS[:-1])


def test_perfect():
    m = RISMetrics()
    g = mask(4, 5, [(0, 0), (1, 2), (3, 4)])
    m.update(g.copy(), g)
    r = m.compute()
    assert r["oIoU"] == 1.0 and r["mIoU"] == 1.0 and r["n"] == 1
    for t in (0.5, 0.6, 0.7, 0.8, 0.9):
        assert r[f"Prec@{t}"] == 1.0
    assert m.ious == [1.0]


def test_disjoint():
    m = RISMetrics()
    m.update(mask(3, 3, [(0, 0)]), mask(3, 3, [(2, 2)]))
    r = m.compute()
    assert r["oIoU"] == 0.0 and r["mIoU"] == 0.0 and r["Prec@0.5"] == 0.0
    assert (m.sum_i, m.sum_u) == (0, 2)


def test_empty_prediction():
    m = RISMetrics()
    m.update(np.zeros((3, 3), bool), mask(3, 3, [(0, 0), (1, 1)]))
    r = m.compute()
    assert r["oIoU"] == 0.0 and r["mIoU"] == 0.0
    assert (m.sum_i, m.sum_u) == (0, 2)


def test_empty_union_counts_zero():
    # docs/DESIGN.md §5: I/U := 0 when U = 0 (both empty); the sample still counts in n and mIoU
    m = RISMetrics()
    z = np.zeros((4, 4), bool)
    assert m.update(z, z) == 0.0
    r = m.compute()
    assert r["oIoU"] == 0.0 and r["mIoU"] == 0.0 and r["Prec@0.5"] == 0.0 and r["n"] == 1
    m.update(first_k(4, 16).reshape(4, 4), first_k(4, 16).reshape(4, 4))
    r = m.compute()
    assert r["oIoU"] == 1.0  # empty sample adds nothing to ΣI, ΣU
    assert r["mIoU"] == 0.5  # but halves the mean
    assert r["Prec@0.9"] == 0.5


def test_empty_metrics():
    r = RISMetrics().compute()
    assert r == {k: 0.0 for k in KEYS[:-1]} | {"n": 0}


def test_mixed_oiou_vs_miou():
    # sample A: big object, I=90, U=100 -> 0.9 ; sample B: small, I=1, U=10 -> 0.1
    m = RISMetrics()
    m.update(first_k(90, 100), first_k(100, 100))
    m.update(first_k(1, 10), first_k(10, 10))
    r = m.compute()
    assert r["oIoU"] == pytest.approx(91 / 110)
    assert r["mIoU"] == pytest.approx(0.5)
    assert r["oIoU"] != pytest.approx(r["mIoU"])
    assert r["Prec@0.5"] == 0.5 and r["Prec@0.9"] == 0.5
    assert m.ious == pytest.approx([0.9, 0.1])
    assert r["n"] == 2


def test_thresholds_inclusive():
    m = RISMetrics()
    # IoUs exactly 0.5, 0.6, 0.7, 0.8, 0.9 and just below 0.5
    for i, u in [(1, 2), (3, 5), (7, 10), (4, 5), (9, 10), (49, 100)]:
        m.update(first_k(i, u), first_k(u, u))
    r = m.compute()
    assert r["Prec@0.5"] == pytest.approx(5 / 6)
    assert r["Prec@0.6"] == pytest.approx(4 / 6)
    assert r["Prec@0.7"] == pytest.approx(3 / 6)
    assert r["Prec@0.8"] == pytest.approx(2 / 6)
    assert r["Prec@0.9"] == pytest.approx(1 / 6)


def test_tensor_input_matches_numpy():
    rng = np.random.default_rng(0)
    a_np, b_np = RISMetrics(), RISMetrics()
    for _ in range(5):
        p = rng.random((6, 7)) > 0.5
        g = rng.random((6, 7)) > 0.4
        a_np.update(p, g)
        b_np.update(torch.from_numpy(p), torch.from_numpy(g))
    assert a_np.compute() == b_np.compute()
    # mixed numpy / tensor and 0/1 integer tensors are accepted
    c = RISMetrics()
    c.update(torch.tensor([[1, 0], [1, 1]], dtype=torch.uint8), np.array([[True, True], [False, True]]))
    assert c.ious == [pytest.approx(2 / 4)]


def test_shape_mismatch_and_bad_dtype():
    m = RISMetrics()
    with pytest.raises(ValueError) as ei:
        m.update(np.zeros((3, 4), bool), np.zeros((4, 3), bool))
    assert "(3, 4)" in str(ei.value) and "(4, 3)" in str(ei.value)
    with pytest.raises(ValueError):
        m.update(torch.zeros(1, 3, 3, dtype=torch.bool), torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="boolean"):
        m.update(np.full((2, 2), 0.7), np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="boolean"):
        m.update(torch.rand(2, 2), torch.ones(2, 2, dtype=torch.bool))
    assert m.n == 0  # failed updates leave no trace


def test_state_merge_equals_single_pass():
    rng = np.random.default_rng(1)
    pairs = [(rng.random((5, 5)) > 0.5, rng.random((5, 5)) > 0.5) for _ in range(11)]
    pairs.append((np.zeros((5, 5), bool), np.zeros((5, 5), bool)))
    single = RISMetrics()
    for p, g in pairs:
        single.update(p, g)
    parts = [RISMetrics(), RISMetrics(), RISMetrics()]
    for k, (p, g) in enumerate(pairs):
        parts[k % 3].update(p, g)
    # merge()
    merged = RISMetrics()
    for x in parts:
        merged.merge(x)
    exp = single.compute()
    got = merged.compute()
    assert got["n"] == exp["n"] == 12
    for k in KEYS[:-1]:
        assert got[k] == pytest.approx(exp[k], abs=1e-12)
    assert sorted(merged.ious) == pytest.approx(sorted(single.ious))
    # state tensors: sum (as all_reduce would) then load
    states = [x.state_tensor() for x in parts]
    assert all(s.dtype == torch.float64 and s.dim() == 1 and s.numel() == 9 for s in states)
    total = torch.stack(states).sum(0)
    assert torch.allclose(total, single.state_tensor())
    for m in (RISMetrics.from_state_tensor(total), RISMetrics().load_state_tensor(total)):
        r = m.compute()
        for k in KEYS[:-1]:
            assert r[k] == pytest.approx(exp[k], abs=1e-12)
        assert r["n"] == 12
    with pytest.raises(ValueError):
        RISMetrics().load_state_tensor(torch.zeros(3))


def test_intersection_union():
    assert intersection_union(first_k(3), first_k(5)) == (3, 5)
    assert intersection_union(torch.from_numpy(first_k(0)), torch.from_numpy(first_k(0))) == (0, 0)


def test_format_table():
    a = RISMetrics()
    a.update(first_k(90, 100), first_k(100, 100))
    a.update(first_k(1, 10), first_k(10, 10))
    rows = {"val": a.compute(), "testA": {**a.compute(), "oIoU": 1.0, "n": 1234}}
    t = format_table(rows)
    lines = t.splitlines()
    assert len(lines) == 4  # header, rule, 2 rows
    assert len({len(line) for line in lines}) == 1  # fixed width
    head = lines[0].split()
    assert head == ["split", "oIoU", "mIoU", "P@0.5", "P@0.6", "P@0.7", "P@0.8", "P@0.9", "n"]
    val = lines[2].split()
    assert val == ["val", "82.73", "50.00", "50.00", "50.00", "50.00", "50.00", "50.00", "2"]
    assert lines[3].split()[:2] == ["testA", "100.00"] and lines[3].split()[-1] == "1234"
