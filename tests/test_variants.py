"""The ZO-SGD variants against naive references that store z, on a quadratic, and through the CLI."""

import pytest
import torch

from conftest import exported
from zotune.cli import main
from zotune.config import ConfigError
from zotune.methods import METHODS, StepKey, list_methods, make_optimizer
from zotune.methods.perturb import Directions
from zotune.stream import keeps_state

VARIANTS = {"zosgd-momentum": dict(momentum=0.8), "zoadam": dict(beta1=0.8, beta2=0.9), "zosgd-sign": {}}


def quadratic(seed=0, shape=(40, 30)):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(*shape, generator=gen), torch.randn(shape[1], generator=gen)]
    targets = [torch.randn(p.shape, generator=gen) for p in params]
    return params, lambda: sum(((p - t) ** 2).sum() for p, t in zip(params, targets))


def reference_update(name, opts, start, ghat, state, lr, wd):
    """The textbook rule, out of place, from the weights before the step and ĝ built from stored z."""
    out = []
    for i, (theta, g) in enumerate(zip(start, ghat)):
        wd_i = wd if theta.dim() >= 2 else 0.0
        if name == "zosgd-momentum":
            m = state.setdefault(i, torch.zeros_like(theta)) * opts["momentum"] + g + wd_i * theta
            state[i] = m
            out.append(theta - lr * m)
        elif name == "zoadam":
            t, m, v = state.get(i, (0, torch.zeros_like(theta), torch.zeros_like(theta)))
            t, m = t + 1, opts["beta1"] * m + (1 - opts["beta1"]) * g
            v = opts["beta2"] * v + (1 - opts["beta2"]) * g * g
            state[i] = (t, m, v)
            denom = (v / (1 - opts["beta2"] ** t)).sqrt() + 1e-8
            out.append(theta * (1 - lr * wd_i) - lr * (m / (1 - opts["beta1"] ** t)) / denom)
        else:
            out.append(theta * (1 - lr * wd_i) - lr * torch.sign(g))
    return out


@pytest.mark.parametrize("n_directions", [1, 2])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_its_naive_reference(name, n_directions):
    params, loss = quadratic()
    lr, wd = 1e-2, 0.1
    opt = make_optimizer(name, params, seed=3, lr=lr, eps=1e-3, weight_decay=wd, n_directions=n_directions,
                         **VARIANTS[name])
    z = Directions()
    state = {}
    for _ in range(4):
        start = [p.clone() for p in params]
        opt.step(loss)
        rec = opt.last
        ghat = [sum(g * z.z(p, rec.seed, k, i) for k, g in enumerate(rec.grads)) / n_directions
                for i, p in enumerate(start)]
        expected = reference_update(name, VARIANTS[name], start, ghat, state, lr, wd)
        # Not bit for bit: the optimizer perturbs and restores in place (rounding about 1e-7).
        for got, want in zip(params, expected):
            assert torch.allclose(got, want, atol=2e-5, rtol=0)
            got.copy_(want)  # keep the comparison step by step


@pytest.mark.parametrize("name", ["zosgd", *VARIANTS, "zosgd-conservative", "hizoo", "forward-grad", "fzoo", "lozo",
                                  "lozo-m", "cge"])
def test_every_method_converges_on_a_quadratic(name):
    """60 values, 500 steps: each method with a learning rate in its stable range gets below 10% of
    the starting loss (measured: zosgd 0.0002, momentum 0.0005, adam 0.0063, sign 0.075)."""
    params, loss = quadratic(1, shape=(6, 8))
    lr = {"zosgd": 1e-2, "zosgd-momentum": 1e-3, "zoadam": 3e-2, "zosgd-sign": 3e-2, "zosgd-conservative": 1e-2,
          "hizoo": 1e-2, "forward-grad": 1e-2, "fzoo": 3e-2, "lozo": 5e-3, "lozo-m": 5e-4, "cge": 1e-1}[name]
    opt = make_optimizer(name, params, seed=0, lr=lr, eps=1e-3, **VARIANTS.get(name, {}))
    start = float(loss())
    for _ in range(500):
        opt.step(loss)
    assert float(loss()) < 0.1 * start, name


@pytest.mark.parametrize("name", [*VARIANTS, "zosgd-conservative", "hizoo", "forward-grad", "sparse-mezo", "fzoo",
                                  "lozo", "lozo-m", "cge"])
def test_state_dict_resume_equals_uninterrupted(name):
    params, loss = quadratic(2)
    opt = make_optimizer(name, params, seed=5, lr=1e-2, **VARIANTS.get(name, {}))
    for _ in range(6):
        opt.step(loss)
    whole = [p.clone() for p in params]

    params, loss = quadratic(2)
    opt = make_optimizer(name, params, seed=5, lr=1e-2, **VARIANTS.get(name, {}))
    for _ in range(3):
        opt.step(loss)
    saved, values = opt.state_dict(), [p.clone() for p in params]
    params, loss = quadratic(2)
    for p, v in zip(params, values):
        p.copy_(v)
    opt = make_optimizer(name, params, seed=5, lr=1e-2, **VARIANTS.get(name, {}))
    opt.load_state_dict(saved)
    for _ in range(3):
        opt.step(loss)
    assert all(torch.equal(a, b) for a, b in zip(whole, params))


@pytest.mark.parametrize("name, options, match", [
    ("zosgd-momentum", dict(momentum=1.0), "method.momentum=1.0 must be in"),
    ("zoadam", dict(beta2=-0.1), "method.beta2=-0.1 must be in"),
    ("zoadam", dict(adam_eps=0.0), "method.adam_eps=0.0 must be > 0"),
    ("zosgd", dict(momentum=0.9), "momentum"),
    ("sgd", {}, "not a known method"),
    ("zosgd-conservative", dict(n_directions=2), "one two-sided direction"),
    ("zosgd-conservative", dict(weight_decay=0.1), "weight_decay=0"),
    ("hizoo", dict(one_sided=True), "one two-sided direction"),
    ("hizoo", dict(hessian_floor=0.0), "hessian_floor=0.0 must be > 0"),
    ("fzoo", dict(one_sided=False), "fzoo takes one-sided probes"),
    ("fzoo", dict(n_directions=1), "at least 2 directions"),
    ("lozo", dict(rank=0), "method.rank=0 must be an integer >= 1"),
    ("lozo", dict(interval=0), "method.interval=0 must be"),
    ("lozo-m", dict(momentum=0.0), "plain LOZO: use method.name=lozo"),
    ("zosgd", dict(n_directions=4, n_directions_max=2), "below method.n_directions=4"),
    ("zosgd", dict(n_directions_max=4, query_beta=0.0), "query_beta=0.0 must be in"),
    ("zosgd", dict(n_directions_max=4, query_every=0), "query_every=0 must be an integer"),
    ("hizoo", dict(n_directions_max=4), "n_directions_max=4: hizoo cannot take that many"),
    ("cge", dict(n_directions=2, n_directions_max=5000), "n_directions=5000 is more than the 1230"),
])
def test_bad_options_are_refused(name, options, match):
    params, _ = quadratic()
    with pytest.raises((ConfigError, TypeError), match=match):
        make_optimizer(name, params, **options)


def test_the_query_schedule_grows_the_directions_sublinearly_and_counts_them():
    from zotune.methods import MethodConfig

    cfg = MethodConfig(n_directions=2, n_directions_max=8, query_beta=0.5, query_every=10)
    assert [cfg.directions_at(t) for t in (0, 9, 10, 20, 30, 149, 150, 10**6)] == [2, 2, 3, 4, 4, 8, 8, 8]
    assert cfg.forwards_in(25) == 2 * (10 * 2 + 10 * 3 + 5 * 4)
    assert cfg.steps_within(100) == 20 and cfg.steps_within(99) == 19
    assert MethodConfig(n_directions=2).forwards_in(25) == 100  # no schedule: n_directions every step
    params, loss = quadratic()
    opt = make_optimizer("zosgd-momentum", params, lr=1e-2, n_directions_max=3, query_beta=1.0, query_every=2)
    counts = []
    for _ in range(7):
        opt.step(loss)
        counts.append(len(opt.last.grads))
    assert counts == [1, 1, 2, 2, 3, 3, 3]


def test_registry_lists_every_method():
    assert list_methods() == sorted(["zosgd", *VARIANTS, "zosgd-conservative", "hizoo", "forward-grad", "sparse-mezo",
                                     "fzoo", "lozo", "lozo-m", "cge"])


@pytest.mark.parametrize("one_sided", [True, False])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_cge_matches_its_naive_reference(wd, one_sided):
    """CGE out of place: for each coordinate c of the step, g = (L(θ + μe_c) − L(θ)) / μ (or the central
    difference), then θ ← θ·(1 − lr·wd) − lr·Σ g_c e_c (wd on matrices only); the coordinates are n
    distinct values, all of them when n is their number."""
    for n in (5, 30 * 4 + 4):
        params, loss = quadratic(shape=(30, 4))
        lr, mu = 1e-2, 5e-3
        opt = make_optimizer("cge", params, seed=3, lr=lr, eps=mu, weight_decay=wd, n_directions=n,
                             one_sided=one_sided)
        for _ in range(3):
            start = [p.clone() for p in params]
            opt.step(loss)
            coords = opt.coordinates(opt.last.key)
            assert len(set(coords.tolist())) == n and (n < 124 or coords.tolist() == list(range(124)))
            got = [p.clone() for p in params]
            for p, s in zip(params, start):
                p.copy_(s)
            base = float(loss())
            grads = []
            for c in coords.tolist():
                plus = _loss_at(params, loss, c, mu)
                grads.append((plus - (base if one_sided else _loss_at(params, loss, c, -mu))) / (mu if one_sided
                                                                                                   else 2 * mu))
            assert opt.last.grads == pytest.approx(grads, rel=1e-3, abs=2e-2)  # (float32 losses near 200, μ 5e-3)
            want = [s * (1 - lr * wd) if s.dim() >= 2 else s.clone() for s in start]
            wflat = torch.cat([w.view(-1) for w in want])
            for c, g in zip(coords.tolist(), opt.last.grads):
                wflat[c] -= lr * g
            assert torch.allclose(torch.cat([g.view(-1) for g in got]), wflat, atol=1e-5, rtol=0)
            for p, w in zip(params, torch.split(wflat, [p.numel() for p in start])):
                p.copy_(w.view(p.shape))  # the next step from the reference's weights
    with pytest.raises(ConfigError, match="n_directions=125 is more than the 124 trained values"):
        make_optimizer("cge", quadratic(shape=(30, 4))[0], n_directions=125)


def _loss_at(params, loss, c, shift):
    """The loss with trained value c (a global index over `params`) moved by `shift`, then put back."""
    for p in params:
        if c < p.numel():
            old = p.view(-1)[c].clone()
            p.view(-1)[c] += shift
            out = float(loss())
            p.view(-1)[c] = old
            return out
        c -= p.numel()
    raise IndexError(c)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_fzoo_matches_its_naive_reference(wd):
    """FZOO from stored z, out of place: l_0 = L(θ), l_k = L(θ + ε z_k), σ the population std of
    l_1..l_N, θ ← θ·(1 − lr·wd) − lr/N Σ (l_k − l_0)/σ z_k (wd on matrices only)."""
    params, loss = quadratic(4)
    lr, eps, n = 1e-2, 1e-3, 5
    opt = make_optimizer("fzoo", params, seed=7, lr=lr, eps=eps, weight_decay=wd, n_directions=n)
    z = Directions()
    for _ in range(3):
        start = [p.clone() for p in params]
        opt.step(loss)
        seed = opt.last.seed
        zs = [[z.z(p, seed, k, i) for i, p in enumerate(start)] for k in range(n)]
        l0 = loss_at(params, loss, start)
        ls = [loss_at(params, loss, [p + eps * zk for p, zk in zip(start, zs[k])]) for k in range(n)]
        sigma = torch.tensor(ls, dtype=torch.float64).std(unbiased=False).item()
        assert opt.last.grads == pytest.approx([(x - l0) / sigma for x in ls], rel=1e-3, abs=1e-3)
        for i, (got, theta) in enumerate(zip(params, start)):
            decay = 1 - lr * wd if theta.dim() >= 2 else 1.0
            want = theta * decay - lr / n * sum((ls[k] - l0) / sigma * zs[k][i] for k in range(n))
            # Not bit for bit: in-place probes round by about 1e-7, and the loss differences are
            # taken from float32 losses near 1e3 (relative 1e-7 of the loss, magnified by 1/σ).
            assert torch.allclose(got, want, atol=1e-4, rtol=0)
            got.copy_(want)


def test_fzoo_moves_nothing_when_every_probe_loss_is_the_same():
    theta = torch.ones(4, 4)
    opt = make_optimizer("fzoo", [theta], seed=0, lr=1.0)
    opt.step(lambda: torch.tensor(3.0))
    assert opt.last.grads == [0.0] * 8 and torch.equal(theta, torch.ones(4, 4))


def loss_at(params, loss, points):
    """The loss with `params` set to `points`, leaving `params` as they were."""
    saved = [p.clone() for p in params]
    for p, q in zip(params, points):
        p.copy_(q)
    value = float(loss())
    for p, q in zip(params, saved):
        p.copy_(q)
    return value


def test_conservative_keeps_the_best_of_three_points_and_replays_exactly():
    choices = set()
    for lr in (3e-3, 0.5):  # a sound step (θ − u wins) and an overshooting one (θ stays)
        params, loss = quadratic(3, shape=(6, 8))
        opt = make_optimizer("zosgd-conservative", params, seed=1, lr=lr)
        z = Directions()
        for _ in range(4):
            start = [p.clone() for p in params]
            opt.step(loss)
            g, choice = opt.last.grads
            u = [lr * g * z.z(p, opt.last.seed, 0, i) for i, p in enumerate(start)]
            candidates = {0.0: start, 1.0: [a - b for a, b in zip(start, u)], -1.0: [a + b for a, b in zip(start, u)]}
            losses = {c: loss_at(params, loss, pts) for c, pts in candidates.items()}
            assert losses[choice] == pytest.approx(min(losses.values()), rel=1e-5)
            assert all(torch.allclose(p, q, atol=1e-5) for p, q in zip(params, candidates[choice]))
            choices.add(choice)
            replayed = [p.clone() for p in start]  # the recorded step redone without a forward
            twin = make_optimizer("zosgd-conservative", replayed, seed=1, lr=lr)
            for k, scale, _ in twin.moves():
                twin.move(twin.indexed(), opt.last.key, k, scale)
            twin.update(twin.indexed(), opt.last)
            assert all(torch.equal(a, b) for a, b in zip(params, replayed))  # bit for bit
    assert choices == {0.0, 1.0}


def _lozo_factors(z, seed, run_seed, key_step, k, i, shape, rank, interval):
    """U (m x r) and V (n x r) of tensor i, drawn as the docstring of methods/lozo.py says."""
    from zotune.methods.lozo import _LAZY
    from zotune.methods.perturb import direction_seed

    m, n = shape[0], int(torch.tensor(shape[1:]).prod())
    u = z.z(torch.empty(m, rank), seed, k, i)
    v = z.z(torch.empty(n, rank), direction_seed(run_seed ^ _LAZY, key_step // interval, 0), 0, i)
    return u, v


@pytest.mark.parametrize("momentum", [0.0, 0.8])
@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_lozo_matches_its_naive_reference(momentum, distribution):
    """LOZO and LOZO-M from stored factors, out of place: Z_k = U_k·Vᵀ for a matrix and a 3-D tensor
    (seen as m x n), ZO-SGD's z for a vector; g_k = (L(θ+εZ_k) − L(θ−εZ_k)) / 2ε; LOZO:
    θ·(1 − lr·wd) − lr·mean g_k Z_k; LOZO-M: N ← β·N + mean g_k U_k (re-expressed by least squares at
    a new V), θ·(1 − lr·wd) − lr·N·Vᵀ. 6 steps with V shared by 2: two changes of V."""
    gen = torch.Generator().manual_seed(9)
    params = [torch.randn(6, 8, generator=gen), torch.randn(4, 3, 5, generator=gen), torch.randn(8, generator=gen)]
    targets = [torch.randn(p.shape, generator=gen) for p in params]
    loss = lambda: sum(((p - t) ** 2).sum() for p, t in zip(params, targets))  # noqa: E731
    lr, eps, wd, rank, interval, n_dir = 1e-3, 1e-3, 0.1, 2, 2, 2
    name = "lozo-m" if momentum else "lozo"
    opt = make_optimizer(name, params, seed=4, lr=lr, eps=eps, weight_decay=wd, n_directions=n_dir, rank=rank,
                         interval=interval, distribution=distribution, **({"momentum": momentum} if momentum else {}))
    z = Directions(distribution)
    coef, buffers = {}, {}
    for step in range(6):
        start = [p.clone() for p in params]
        opt.step(loss)
        rec = opt.last
        for i, (p, theta) in enumerate(zip(params, start)):
            if theta.dim() < 2:
                dirs = [z.z(theta, rec.seed, k, i) for k in range(n_dir)]
                ghat = sum(g * d for g, d in zip(rec.grads, dirs)) / n_dir
                if momentum:
                    buffers[i] = buffers.get(i, torch.zeros_like(theta)) * momentum + ghat
                    ghat = buffers[i]
                want = theta - lr * ghat
            else:
                factors = [_lozo_factors(z, rec.seed, 4, step, k, i, theta.shape, rank, interval) for k in range(n_dir)]
                v = factors[0][1]
                decayed = theta * (1 - lr * wd)
                if momentum:
                    if i in coef and step % interval == 0:
                        old = coef[i][1]
                        coef[i] = (coef[i][0] @ old.T @ v @ torch.linalg.pinv(v.T @ v), v)
                    n_new = coef.get(i, (torch.zeros(theta.shape[0], rank), v))[0] * momentum
                    n_new = n_new + sum(g * u for g, (u, _) in zip(rec.grads, factors)) / n_dir
                    coef[i] = (n_new, v)
                    want = decayed - lr * (n_new @ v.T).view(theta.shape)
                else:
                    zhat = sum(g * (u @ vv.T) for g, (u, vv) in zip(rec.grads, factors)) / n_dir
                    want = decayed - lr * zhat.view(theta.shape)
            # Not bit for bit: the optimizer perturbs and restores in place (rounding about 1e-7).
            assert torch.allclose(p, want, atol=2e-5, rtol=0), (step, i)
            p.copy_(want)
            if momentum and theta.dim() >= 2:
                opt.state_of(i)["coefficients"].copy_(coef[i][0])  # keep the comparison step by step
            elif momentum:
                opt.state_of(i)["momentum_buffer"].copy_(buffers[i])
        # the first probe's loss is the loss at θ + εZ_0 (the directions above are the ones probed)
        first = [theta + eps * (z.z(theta, rec.seed, 0, i) if theta.dim() < 2 else
                                (lambda u, v: (u @ v.T).view(theta.shape))(
                                    *_lozo_factors(z, rec.seed, 4, step, 0, i, theta.shape, rank, interval)))
                 for i, theta in enumerate(start)]
        assert rec.losses[0] == pytest.approx(float(sum(((a - t) ** 2).sum() for a, t in zip(first,
                                                                                             targets))), rel=1e-5)
    floats = 6 * rank + 4 * rank + 8 if momentum else 0
    assert opt.state_floats() == floats
    assert sum(t.numel() for s in opt.tensor_state.values() for t in s.values()) == floats


def test_lozo_directions_are_low_rank_and_shared_within_a_window():
    """The move of a step is a rank-r matrix; V spans the same columns for `interval` steps, then changes."""
    theta = torch.zeros(12, 10)
    opt = make_optimizer("lozo", [theta], seed=1, rank=2, interval=3)
    spans = []
    for step in range(4):
        key = opt.begin()
        before = theta.clone()
        opt.move([(0, theta)], key, 0, 1.0)
        moved = theta - before
        assert torch.linalg.matrix_rank(moved) <= 2
        # ±1 factors, r = 2: every entry is 0 or ±2, so scale·Z is exact (the same bits with or without FMA)
        assert set(moved.unique().tolist()) <= {-2.0, 0.0, 2.0}
        spans.append(torch.linalg.svd(moved).Vh[:2])
        opt.finish(key, [0.0, 0.0])
    same = lambda a, b: torch.allclose(a.T @ a, b.T @ b, atol=1e-5)  # noqa: E731 -- the same row space
    assert same(spans[0], spans[1]) and same(spans[1], spans[2]) and not same(spans[2], spans[3])


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_lozo_fused_kernel_and_matrix_product_equal_the_fixed_order_sum_bit_for_bit(rank):
    """±1 factors: the fused one-pass kernel (float32 CPU, r in {1, 2, 4}) == U·Vᵀ by one BLAS product
    (the eager path) == r outer products summed in a fixed order (the path for real-valued factors),
    for a move and a fused restore + decay + update."""
    from zotune.methods import kernels

    gen = torch.Generator().manual_seed(3)
    p = torch.randn(300, 70, generator=gen)
    opt = make_optimizer("lozo", [p], rank=rank)
    key = opt.begin()
    u, v = opt._u(p, key, 0, 0), opt._v(p, 0, 0)
    for terms in [(1e-3, 1.0, 0.0), (-1e-3, 0.999, -3e-4), (0.0, 1.0, 2.5e-4)]:
        fused, product, fixed = p.clone(), p.clone(), p.clone()
        opt._add_low_rank(fused, u, v, *terms, integers=True)
        opt._directions.fused = False
        opt._add_low_rank(product, u, v, *terms, integers=True)
        opt._add_low_rank(fixed, u, v, *terms, integers=False)
        opt._directions.fused = True
        assert torch.equal(product, fixed) and not torch.equal(product, p)
        if kernels.available():
            assert torch.equal(fused, product)


def test_lozo_keeps_the_factors_of_two_steps_and_two_windows_and_draws_the_same_ones_again():
    """The CPU cache of U (per step) and V (per window) returns what a fresh draw gives, and stays small."""
    p = torch.randn(40, 30)
    opt = make_optimizer("lozo", [p], interval=2)
    fresh = make_optimizer("lozo", [p.clone()], interval=2)
    for step in range(6):
        key = StepKey(step, 1000 + step)
        assert torch.equal(opt._u(p, key, 0, 0), fresh._u(p, key, 0, 0))
        assert opt._u(p, key, 0, 0) is opt._u(p, key, 0, 0)  # kept, not drawn again
        assert torch.equal(opt._v(p, opt._window(step), 0), fresh._v(p, fresh._window(step), 0))
    kinds = [tag[0] for tag in opt._factors]
    assert kinds.count("u") == 2 and kinds.count("v") == 2  # the last two steps and windows only


def test_hizoo_matches_its_naive_reference():
    params, loss = quadratic(4, shape=(6, 8))
    lr, eps, alpha = 1e-2, 1e-3, 0.1
    opt = make_optimizer("hizoo", params, seed=2, lr=lr, eps=eps, hessian_smoothing=alpha)
    z = Directions()
    hessian = [torch.ones_like(p) for p in params]
    for _ in range(4):
        start = [p.clone() for p in params]
        opt.step(loss)
        g, d = opt.last.grads
        base, plus, minus = opt.last.losses
        assert d == pytest.approx(abs(plus + minus - 2 * base) / (2 * eps ** 2))
        for i, (p, before, h) in enumerate(zip(params, start, hessian)):
            zi = z.z(p, opt.last.seed, 0, i)
            assert torch.allclose(p, before - lr * g * zi / h.sqrt(), atol=2e-5)  # the step used the old H
            h.mul_(1 - alpha).add_(alpha * d * zi * zi).clamp_(min=1e-8)
            assert torch.allclose(opt.state_of(i)["hessian"], h, rtol=1e-5)


STREAMS = None  # no refusal: the method streams on both tiers, its state travelling with the blocks


@pytest.mark.parametrize("method, refusal", [
    (["--method", "zosgd-momentum"], STREAMS),
    (["--method", "zoadam", "method.beta1=0.8"], STREAMS),
    (["--method", "hizoo", "method.hessian_smoothing=0.1"], STREAMS),
    (["--method", "zosgd-conservative"], "forwards come after its update"),
    (["--method", "forward-grad"], "jvp needs every trainable tensor"),
    (["--method", "sparse-mezo", "method.sparsity=0.5"], STREAMS),
    (["--method", "fzoo", "method.n_directions=3"], STREAMS),
    (["--method", "lozo-m", "method.interval=2", "method.n_directions=2"], STREAMS),
    (["--method", "cge", "method.n_directions=3"], STREAMS),
    # AdaZeta's query schedule (1, 1, 2, 2, 3, 3 directions): each piece of a step takes its own step's count
    (["--method", "zosgd-momentum", "method.n_directions_max=3", "method.query_beta=1", "method.query_every=2"],
     STREAMS),
    (["--method", "lozo-m", "method.interval=2", "method.n_directions_max=3", "method.query_beta=1",
      "method.query_every=2"], STREAMS),
])
def test_cli_trains_and_resumes_every_method_exactly(method, refusal, tiny_model_dir, data_file, tmp_path, capsys):
    def args(out, steps):
        return ["train", "--model", str(tiny_model_dir), "--data", str(data_file), "--out", str(out), "--steps",
                str(steps), "run.batch_size=4", "task.n_dev=4", "task.n_test=8", "run.eval_every=0",
                "run.snapshot_every=2", "run.device=cpu", "--lr", "1e-3",
                "task.verbalizer={pos: great, neg: terrible}", "model.trainable=last-blocks:2", *method]
    assert main(args(tmp_path / "whole", 6)) == 0
    assert main(args(tmp_path / "parts", 3)) == 0
    assert main(["resume", str(tmp_path / "parts"), "run.steps=6"]) == 0
    assert (tmp_path / "parts" / "steps.log").read_bytes() == (tmp_path / "whole" / "steps.log").read_bytes()
    capsys.readouterr()
    # An option of another method, and a method streaming cannot run, are refused with one line.
    takes_momentum = method[1] in ("zosgd-momentum", "lozo-m")
    assert main([*args(tmp_path / "x", 2), "method.beta1=0.9" if takes_momentum else "method.momentum=0.9"]) == 2
    assert ("beta1" if takes_momentum else "momentum") in capsys.readouterr().err
    if refusal is not STREAMS:
        for tier in (["--offload", "cpu"], ["--offload", "disk", "--offload-dir", str(tmp_path / "blocks")]):
            assert main([*args(tmp_path / tier[1], 2), *tier]) == 2
            assert refusal in capsys.readouterr().err
        assert not (tmp_path / "blocks").exists()  # refused before a block was written
        return
    # Its state travels with the blocks, in host memory or in their slots on disk: streamed, stopped
    # and resumed == resident, bit for bit (the RAM tier's state comes back by replay, the disk
    # tier's from the blocks' files).
    whole = exported(tmp_path / "whole", tmp_path / "whole-model")
    for name, tier, folder in [("ram", ["--offload", "cpu"], None),
                               ("disk", ["--offload", "disk", "--offload-dir", str(tmp_path / "blocks")],
                                tmp_path / "blocks")]:
        out = tmp_path / name
        assert main([*args(out, 3), *tier]) == 0
        assert main(["resume", str(out), "run.steps=6"]) == 0
        assert (out / "steps.log").read_bytes() == (tmp_path / "whole" / "steps.log").read_bytes(), name
        got = exported(out, tmp_path / f"{name}-model")
        assert got.keys() == whole.keys() and all(torch.equal(got[k], whole[k]) for k in whole), name
        # the blocks' state was in their slots on disk
        if folder is not None and keeps_state(make_optimizer(method[1], [torch.zeros(8, 4)])):
            assert any(folder.glob("block-*.state-*.safetensors"))


def test_forward_gradient_is_the_exact_directional_derivative_and_replays():
    """g = ∇L·z by one forward-mode forward (SDPA on its math kernel), against autograd's gradient
    dotted with the same z; the update θ − lr·g·z; and replay from the record, bit for bit."""
    from conftest import tiny_model

    model = tiny_model("llama")
    params = [p for n, p in model.named_parameters() if n.startswith("model.layers.1.")]
    start = [p.clone() for p in params]
    ids = torch.randint(3, 200, (2, 10), generator=torch.Generator().manual_seed(0))
    opt = make_optimizer("forward-grad", params, seed=3, lr=1e-2, weight_decay=0.1)
    opt.step(lambda: model(input_ids=ids, labels=ids).loss)
    record = opt.last
    twin = tiny_model("llama")
    twin_params = [p for n, p in twin.named_parameters() if n.startswith("model.layers.1.")]
    for p in twin_params:
        p.requires_grad_(True)
    grads = torch.autograd.grad(twin(input_ids=ids, labels=ids).loss, twin_params)
    zs = [Directions().z(p, record.seed, 0, i) for i, p in enumerate(start)]
    assert record.grads[0] == pytest.approx(float(sum((g * z).sum() for g, z in zip(grads, zs))), rel=1e-4)
    for p, before, z in zip(params, start, zs):
        wd = 0.1 if p.dim() >= 2 else 0.0
        assert torch.allclose(p, before * (1 - 1e-2 * wd) - 1e-2 * record.grads[0] * z, atol=1e-6)
    replayed = [b.clone() for b in start]
    again = make_optimizer("forward-grad", replayed, seed=3, lr=1e-2, weight_decay=0.1)
    again.replay(record)
    assert all(torch.equal(a, b) for a, b in zip(params, replayed))


@pytest.mark.parametrize("n_directions,wd", [(1, 0.0), (1, 0.1), (2, 0.0)])
def test_sparse_mezo_matches_its_naive_reference(n_directions, wd):
    """Stored z, a mask taken from the weights at rest at each step, thresholds from step 0: the same
    moves and update out of the optimizer's hands; values outside the mask never move (but decay)."""
    from zotune.methods.sparse import pack, unpack

    params, loss = quadratic(5, shape=(12, 10))
    lr, eps, sparsity = 1e-2, 1e-3, 0.7
    opt = make_optimizer("sparse-mezo", params, seed=4, lr=lr, eps=eps, weight_decay=wd, n_directions=n_directions,
                         sparsity=sparsity)
    twin = [p.clone() for p in params]
    thresholds = [float(p.abs().flatten().kthvalue(round(0.3 * p.numel())).values) for p in twin]
    z = Directions()
    for _ in range(4):
        opt.step(loss)
        rec = opt.last
        masks = [t.abs() <= th for t, th in zip(twin, thresholds)]
        assert all(torch.equal(unpack(pack(m), m), m) for m in masks)
        zs = [[z.z(t, rec.seed, k, i) * m for i, (t, m) in enumerate(zip(twin, masks))] for k in range(n_directions)]
        frozen = [t[~m].clone() for t, m in zip(twin, masks)]
        for i, t in enumerate(twin):
            wd_i = wd if t.dim() >= 2 else 0.0
            t.mul_(1 - lr * wd_i)
            for k in range(n_directions):
                t.add_(zs[k][i], alpha=-lr * rec.grads[k] / n_directions)
        for got, want, m, before in zip(params, twin, masks, frozen):
            assert torch.allclose(got, want, atol=2e-5, rtol=0)
            decay = 1 - lr * wd if got.dim() >= 2 else 1.0
            assert torch.allclose(got[~m], before * decay, atol=1e-6)  # the large values only decay
            got.copy_(want)
    assert 0.25 < masks[0].float().mean() < 0.35  # about 1 − sparsity of the values take part


def test_sparse_mezo_fits_a_change_in_the_small_weights_and_replays_exactly():
    gen = torch.Generator().manual_seed(7)
    theta = torch.randn(8, 8, generator=gen)
    target = theta.clone()
    small = theta.abs() <= theta.abs().flatten().kthvalue(32).values
    target[small] += 0.2 * torch.randn(int(small.sum()), generator=gen)
    base = theta.clone()
    def loss():
        return ((theta - target) ** 2).sum()
    start = float(loss())
    opt = make_optimizer("sparse-mezo", [theta], seed=0, lr=1e-2, sparsity=0.25)
    for _ in range(500):
        opt.step(loss)
    assert float(loss()) < 0.1 * start
    records = []
    opt2 = make_optimizer("sparse-mezo", [base], seed=0, lr=1e-2, sparsity=0.5)
    replayer = make_optimizer("sparse-mezo", [base.clone()], seed=0, lr=1e-2, sparsity=0.5)
    for _ in range(5):
        opt2.step(lambda: ((base - target) ** 2).sum())
        records.append(opt2.last)
    for rec in records:
        replayer.replay(rec)
    assert torch.equal(replayer.param_groups[0]["params"][0], base)
    with pytest.raises(ConfigError, match="sparsity"):
        make_optimizer("sparse-mezo", [theta], sparsity=1.0)


@pytest.mark.parametrize("method,quantize",
                         [*((m, None) for m in list_methods()), ("zosgd", "int8"), ("zosgd", "int4")])
def test_bench_memory_counts_the_state_each_method_says_it_keeps(method, quantize):
    """`zotune bench memory`'s measurement on a small shape: the state bytes it counts are the method's
    `state_per_value` floats per trainable value (the measurement itself asserts it), on a quantized
    base the values are the scales alone."""
    from zotune.bench.memory import _child

    got = _child({"shape": "tiny", "batch": 2, "seq": 8, "method": method, "quantize": quantize})
    if method == "lozo-m":  # m x r floats per matrix (r = 2 of n >= 64 columns) and the vectors' buffers
        assert 0 < got["state_bytes"] < 0.1 * 4 * got["values"]
    else:
        assert got["state_bytes"] == METHODS[method][1].state_per_value * 4 * got["values"]
    assert got["peak_rss"] > 0
    if quantize:  # two OPT blocks of hidden 64: q k v out (64 x 64), fc1 (256 x 64), fc2 (64 x 256)
        per_block = {"int8": 4 * 64 + 256 + 64,  # a scale per row
                     "int4": 4 * 64 * 2 + 256 * 2 + 64 * 8}[quantize]  # a scale per row and 32 inputs
        assert got["values"] == 2 * per_block
