"""ZOSGD against naive references that materialise z, and its guarantees."""

import math

import pytest
import torch

from zotune import ZOSGD, ConfigError, NonFiniteLossError, make_optimizer
from zotune.methods.perturb import CHUNK, Directions, direction_seed


def small_net(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def batches(k, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)) for _ in range(k)]


def loss_fn(net, x, y):
    return torch.nn.functional.cross_entropy(net(x), y)


def rademacher_reference(n, seed, k, i):
    """Format 2 from its definition, in Python integers: word j = splitmix64(key + j·γ) for
    key = direction_seed(s, k, i); value 32m + b is −1 when bit 31 − b of 32-bit word m (the
    little-endian halves of the 64-bit words) is set."""
    from zotune.methods.perturb import _splitmix64

    key, values = direction_seed(seed, k, i), []
    for j in range((n + 63) // 64):
        word = _splitmix64((key + j * 0x9E3779B97F4A7C15) & ((1 << 64) - 1))
        for half in (word & 0xFFFFFFFF, word >> 32):
            values += [-1.0 if half >> (31 - b) & 1 else 1.0 for b in range(32)]
    return torch.tensor(values[:n])


def materialised_z(params, seed, k, distribution="rademacher"):
    """z for every tensor, made independently of zotune's Directions: Rademacher from its definition,
    Gaussian with the same seeding scheme (chunk c of tensor i from its own seed) on one thread."""
    out = []
    for i, p in enumerate(params):
        if distribution == "rademacher":
            out.append(rademacher_reference(p.numel(), seed, k, i).view(p.shape))
            continue
        flat = torch.empty(p.numel())
        for c, start in enumerate(range(0, p.numel(), CHUNK)):
            gen = torch.Generator().manual_seed(direction_seed(seed, k, i, c))
            flat[start: start + CHUNK].normal_(generator=gen)
        out.append(flat.view(p.shape))
    return out


def reference_inplace_step(params, closure, seed, lr, eps, wd, n=1, one_sided=False, distribution="rademacher"):
    """MeZO's sequence with stored z: +εz, L+, −2εz, L−, +εz (restore), then the update."""
    zs = [materialised_z(params, seed, k, distribution) for k in range(n)]
    grads = []
    base = float(closure()) if one_sided else None
    for k in range(n):
        for p, z in zip(params, zs[k]):
            p.add_(z, alpha=eps)
        plus = float(closure())
        if one_sided:
            grads.append((plus - base) / eps)
            for p, z in zip(params, zs[k]):
                p.add_(z, alpha=-eps)
            continue
        for p, z in zip(params, zs[k]):
            p.add_(z, alpha=-2 * eps)
        minus = float(closure())
        for p, z in zip(params, zs[k]):
            p.add_(z, alpha=eps)
        grads.append((plus - minus) / (2 * eps))
    for i, p in enumerate(params):
        if wd and p.dim() >= 2:
            p.mul_(1 - lr * wd)
        for k in range(n):
            p.add_(zs[k][i], alpha=-lr * grads[k] / n)
    return grads


def functional_step(params, loss_at, seed, lr, eps, wd):
    """The textbook formula, out of place: no perturb/restore round trip at all."""
    zs = materialised_z(params, seed, 0)
    plus = float(loss_at([p + eps * z for p, z in zip(params, zs)]))
    minus = float(loss_at([p - eps * z for p, z in zip(params, zs)]))
    g = (plus - minus) / (2 * eps)
    return [p - lr * (g * z + (wd if p.dim() >= 2 else 0.0) * p) for p, z in zip(params, zs)], g


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
@pytest.mark.parametrize("n,one_sided,wd",
                         [(1, False, 0.0), (1, False, 0.1), (3, False, 0.0), (1, True, 0.0), (2, True, 0.1)])
def test_inplace_matches_reference_with_stored_z_bit_for_bit(n, one_sided, wd, distribution):
    net_a, net_b = small_net(), small_net()
    opt = ZOSGD(net_a.parameters(), lr=0.05, eps=1e-3, weight_decay=wd, n_directions=n, one_sided=one_sided, seed=7,
                distribution=distribution)
    params_b = list(net_b.parameters())
    for x, y in batches(5):
        opt.step(lambda: loss_fn(net_a, x, y))
        with torch.no_grad():
            grads = reference_inplace_step(params_b, lambda: loss_fn(net_b, x, y), opt.last.seed, 0.05, 1e-3, wd, n,
                                           one_sided, distribution)
        assert grads == opt.last.grads
    for a, b in zip(net_a.parameters(), params_b):
        assert torch.equal(a, b)


def test_inplace_matches_functional_formula_within_rounding():
    # In place, L− is evaluated at (θ+εz)−2εz rather than θ−εz: the same point up to float32
    # rounding (~1e-7 relative). g = ΔL/2ε magnifies that by 1/2ε = 500, so g agrees to ~1e-4 and
    # the weights to ~1e-5 after 5 steps; a wrong sign, z or decay would be off by ~1e-2.
    net = small_net()
    ref = [p.clone() for p in small_net().parameters()]
    opt = ZOSGD(net.parameters(), lr=0.05, eps=1e-3, weight_decay=0.1, seed=3)
    names = [n for n, _ in net.named_parameters()]
    for x, y in batches(5):
        opt.step(lambda: loss_fn(net, x, y))
        def loss_at(ps):
            return loss_fn(lambda inp: torch.func.functional_call(net, dict(zip(names, ps)), (inp,)), x, y)
        ref, g = functional_step(ref, loss_at, opt.last.seed, 0.05, 1e-3, 0.1)
        assert g == pytest.approx(opt.last.grads[0], rel=1e-3, abs=1e-3)
    for a, b in zip(net.parameters(), ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_perturb_then_restore_returns_the_weights_to_float32_rounding():
    torch.manual_seed(0)
    params = [torch.randn(256, 256), torch.randn(256)]
    before = [p.clone() for p in params]
    d = Directions()
    d.sweep(params, 123, 0, 1e-3)
    d.sweep(params, 123, 0, -2e-3)
    d.sweep(params, 123, 0, 1e-3)
    for p, q in zip(params, before):
        # Each add rounds to half an ulp of the running value: 3 adds stay within 2 ulp of |θ|+ε|z|.
        ulp = torch.finfo(torch.float32).eps * (q.abs() + 1e-3 * 6)
        assert ((p - q).abs() <= 2 * ulp).all()  # measured: about half come back exactly


def test_directions_are_regenerated_not_stored_and_ignore_the_global_rng():
    p = torch.zeros(1000)
    d = Directions()
    a = d.z(p, 5, 0, 0).clone()
    torch.manual_seed(999)
    torch.randn(10)
    assert torch.equal(d.z(p, 5, 0, 0), a)
    assert not torch.equal(d.z(p, 5, 1, 0), a)  # another direction
    assert not torch.equal(d.z(p, 5, 0, 1), a)  # another tensor
    assert not torch.equal(d.z(p, 6, 0, 0), a)  # another step


def test_global_rng_use_inside_the_closure_does_not_change_the_run():
    def run(noisy):
        net = small_net()
        opt = ZOSGD(net.parameters(), lr=0.05, eps=1e-3, seed=1)
        for x, y in batches(3):
            def closure():
                if noisy:
                    torch.rand(100)  # e.g. dropout or sampling drawing from the global RNG
                return loss_fn(net, x, y)
            opt.step(closure)
        return [p.clone() for p in net.parameters()]
    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_no_weight_decay_on_tensors_with_dim_below_two():
    net = small_net()
    before = {n: p.clone() for n, p in net.named_parameters()}
    opt = ZOSGD(net.parameters(), lr=0.1, eps=1e-3, weight_decay=1.0, seed=0)
    opt.step(lambda: torch.tensor(1.0))  # constant loss: g = 0, only weight decay moves θ
    for name, p in net.named_parameters():
        if p.dim() >= 2:
            torch.testing.assert_close(p, before[name] * 0.9, rtol=0, atol=1e-6)
        else:
            torch.testing.assert_close(p, before[name], rtol=0, atol=1e-6)


def test_converges_on_a_quadratic():
    torch.manual_seed(0)
    target = torch.randn(20)
    theta = torch.zeros(20)
    opt = ZOSGD([theta], lr=0.02, eps=1e-3, seed=0)
    def loss():
        return ((theta - target) ** 2).sum()
    start = float(loss())
    for _ in range(600):
        opt.step(loss)
    assert float(loss()) < 0.01 * start


def test_n_spsa_lowers_variance_on_a_quadratic():
    def final(n):
        torch.manual_seed(0)
        target = torch.randn(50)
        theta = torch.zeros(50)
        opt = ZOSGD([theta], lr=0.01, eps=1e-3, n_directions=n, seed=0)
        for _ in range(150):
            opt.step(lambda: ((theta - target) ** 2).sum())
        return float(((theta - target) ** 2).sum())
    assert final(8) < final(1)


@pytest.mark.parametrize("n,one_sided,wd", [(1, False, 0.01), (3, False, 0.0), (1, True, 0.0), (2, True, 0.01)])
def test_replay_from_records_rebuilds_the_weights_bit_for_bit(n, one_sided, wd):
    net, base = small_net(), small_net()
    kw = dict(lr=0.05, eps=1e-3, weight_decay=wd, n_directions=n, one_sided=one_sided)
    opt = ZOSGD(net.parameters(), seed=4, **kw)
    records = []
    for x, y in batches(6):
        opt.step(lambda: loss_fn(net, x, y))
        records.append(opt.last)
    replayer = ZOSGD(base.parameters(), **kw)
    for rec in records:
        replayer.replay(rec)  # no forward: the same moves, so the same roundings
    assert replayer.steps == 6
    for a, b in zip(net.parameters(), base.parameters()):
        assert torch.equal(a, b)


def test_state_dict_resume_equals_uninterrupted():
    data = batches(6)
    net = small_net()
    opt = ZOSGD(net.parameters(), lr=0.05, eps=1e-3, seed=9)
    for x, y in data:
        opt.step(lambda: loss_fn(net, x, y))
    net2 = small_net()
    opt2 = ZOSGD(net2.parameters(), lr=0.05, eps=1e-3, seed=9)
    for x, y in data[:3]:
        opt2.step(lambda: loss_fn(net2, x, y))
    state = {k: v.clone() for k, v in net2.state_dict().items()}, opt2.state_dict()
    net3 = small_net()
    net3.load_state_dict(state[0])
    opt3 = ZOSGD(net3.parameters(), lr=0.05, eps=1e-3, seed=0)
    opt3.load_state_dict(state[1])
    for x, y in data[3:]:
        opt3.step(lambda: loss_fn(net3, x, y))
    assert opt3.steps == 6
    for a, b in zip(net.parameters(), net3.parameters()):
        assert torch.equal(a, b)


def test_non_finite_loss_stops_with_weights_restored():
    net = small_net()
    before = [p.clone() for p in net.parameters()]
    opt = ZOSGD(net.parameters(), lr=0.05, eps=1e-3)
    calls = []
    def closure():
        calls.append(1)
        return torch.tensor(float("nan") if len(calls) == 2 else 1.0)
    with pytest.raises(NonFiniteLossError, match="step 1"):
        opt.step(closure)
    for a, b in zip(net.parameters(), before):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_interrupt_inside_a_forward_leaves_weights_restored():
    net = small_net()
    before = [p.clone() for p in net.parameters()]
    opt = ZOSGD(net.parameters(), lr=0.05, eps=1e-3)
    def closure():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    for a, b in zip(net.parameters(), before):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(lr=-1.0), "lr"), (dict(eps=0.0), "eps"), (dict(eps=-1e-3), "eps"), (dict(lr=float("nan")), "lr"),
    (dict(n_directions=0), "n_directions"), (dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_hyperparameters_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ZOSGD(small_net().parameters(), **kwargs)
    with pytest.raises(ConfigError, match=match):
        make_optimizer("zosgd", small_net().parameters(), **kwargs)


def test_make_optimizer_rejects_unknown_method():
    with pytest.raises(ConfigError, match="not a known method"):
        make_optimizer("adamw", small_net().parameters())


def test_step_returns_mean_probe_loss_and_records_seed():
    net = small_net()
    opt = ZOSGD(net.parameters(), lr=0.0, eps=1e-3, seed=2)
    x, y = batches(1)[0]
    loss = opt.step(lambda: loss_fn(net, x, y))
    assert math.isclose(float(loss), sum(opt.last.losses) / 2, rel_tol=1e-6)
    assert opt.last.step == 0 and isinstance(opt.last.seed, int) and len(opt.last.grads) == 1


def test_multi_chunk_directions_match_the_sequential_reference_whatever_the_threads():
    from zotune.methods import perturb

    p = torch.zeros(2 * CHUNK + 123)
    ref = materialised_z([p], 11, 2, "gaussian")[0]
    for threads in (1, 2, 3):
        assert torch.equal(Directions("gaussian", threads=threads).z(p, 11, 2, 0), ref)
    assert perturb.CHUNK == CHUNK


@pytest.mark.parametrize("n", [CHUNK + 77, 64, 31])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_rademacher_signs_are_the_bits_of_the_counter_words(n, dtype):
    """Format 2: word j = splitmix64(key + j·γ) for key = direction_seed(s, k, i); value 32m + k is −1
    when bit 31 − k of 32-bit word m (little-endian halves of the 64-bit words) is set."""

    z = Directions("rademacher").z(torch.zeros(n, dtype=dtype), 3, 0, 5)
    assert z.dtype == dtype and torch.equal(z.float(), rademacher_reference(n, 3, 0, 5))
    if n > CHUNK:  # every bit position is a fair coin
        per_position = (z[: CHUNK].view(-1, 64) > 0).float().mean(0)
        assert per_position.min() > 0.45 and per_position.max() < 0.55


@pytest.mark.parametrize("n", [2 * CHUNK + 77, 1000, 31, 1])
@pytest.mark.parametrize("terms", [(1e-3, 1.0, 0.0), (-2e-3, 1.0, 0.0), (1e-3, 0.999, -3e-4), (0.0, 1.0, 0.37),
                                   (5e-4, 1.0, -2e-4)])
@pytest.mark.parametrize("serial_below", [0, 1 << 30])  # every size on the parallel kernels, then the serial ones
def test_fused_rademacher_kernel_equals_the_eager_path_bit_for_bit(n, terms, serial_below, monkeypatch):
    """The numba kernel (one pass) against the eager draw-expand-add chunks: the same bits."""
    from zotune.methods import kernels

    if not kernels.available():
        pytest.skip("numba is not installed")
    monkeypatch.setattr(kernels, "SERIAL_BELOW", serial_below)
    p = torch.randn(n, generator=torch.Generator().manual_seed(n))
    fast, slow = Directions("rademacher"), Directions("rademacher")
    slow.fused = False
    a, b = p.clone(), p.clone()
    fast.add(a, 7, 1, 3, *terms)
    slow.add(b, 7, 1, 3, *terms)
    assert torch.equal(a, b) and not torch.equal(a, p)
    z = slow.z(p, 7, 1, 3)  # and both are the definition: (p + s·z)·d + t·z
    scale, decay, then = terms
    assert torch.allclose(a, (p + scale * z) * decay + then * z, atol=1e-6, rtol=0)


def test_a_rademacher_run_is_the_same_with_and_without_the_kernel():
    from zotune.methods import kernels

    if not kernels.available():
        pytest.skip("numba is not installed")
    runs = []
    for fused in (True, False):
        net = small_net()
        opt = ZOSGD(list(net.parameters()), lr=1e-2, eps=1e-3, weight_decay=0.1, seed=4, distribution="rademacher")
        opt._directions.fused = fused
        for x, y in batches(5):
            opt.step(lambda: loss_fn(net, x, y))
        runs.append([p.clone() for p in net.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("call", [
    "kernels.signs_axpy(torch.zeros(kernels.SERIAL_BELOW + 1), 3, 0, 0.5)",
    "kernels.low_rank_axpy(torch.zeros(64, 64), torch.ones(64, 1), torch.ones(64, 1), 0.5)",
], ids=["signs", "low-rank"])
def test_the_parallel_kernels_leave_torch_on_the_threads_it_was_given(call):
    """numba's OpenMP layer sets the process's thread count to its own (every core) when it starts: a run
    on one thread went on with two after its first big sweep (its matmuls, so its bits, changed mid-run).
    Each kernel in a fresh process, as the layer starts once per process."""
    import os
    import subprocess
    import sys

    from zotune.methods import kernels

    if not kernels.available():
        pytest.skip("numba is not installed")
    code = (f"import torch; from zotune.methods import kernels; kernels.available(); {call}; "
            "print(torch.get_num_threads())")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1"]


def test_format_1_rademacher_draws_stay_what_they_were():
    """Runs trained before format 2 replay with their own directions (bits hashed when it was current)."""
    import hashlib

    z = Directions("rademacher", version=1).z(torch.zeros(3 * CHUNK + 77), 3, 0, 5)
    digest = hashlib.sha256((z > 0).to(torch.uint8).numpy().tobytes()).hexdigest()
    assert digest[:32] == "541ecf61d327c6f3f66ce9fd93a57b2d"
    assert not torch.equal(z, Directions("rademacher").z(torch.zeros(3 * CHUNK + 77), 3, 0, 5))
    with pytest.raises(ConfigError, match="newer than this zotune"):
        ZOSGD([torch.zeros(3)], directions_format=3)


def test_rademacher_directions_are_signs_and_train():
    p = torch.zeros(CHUNK + 77)
    z = Directions("rademacher").z(p, 3, 0, 0)
    assert set(z.unique().tolist()) == {-1.0, 1.0} and abs(float(z.mean())) < 0.01
    torch.manual_seed(0)
    target = torch.randn(20)
    theta = torch.zeros(20)
    opt = ZOSGD([theta], lr=0.02, eps=1e-3, seed=0, distribution="rademacher")
    def loss():
        return ((theta - target) ** 2).sum()
    start = float(loss())
    for _ in range(300):
        opt.step(loss)
    assert float(loss()) < 0.01 * start
    with pytest.raises(ConfigError, match="distribution"):
        ZOSGD([theta], distribution="uniform")


def test_parameters_that_require_grad_and_span_several_chunks():
    torch.manual_seed(0)
    big = torch.nn.Parameter(torch.randn(CHUNK * 2 + 5))  # requires_grad, as in a freshly built model
    target = torch.randn(CHUNK * 2 + 5)
    opt = ZOSGD([big], lr=1e-7, eps=1e-3, weight_decay=0.1)
    before = big.detach().clone()
    opt.step(lambda: ((big - target) ** 2).sum())
    assert big.requires_grad and not torch.equal(big.detach(), before)
