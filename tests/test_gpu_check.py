"""The GPU check and the CUDA kernel, on the CPU: the check's parts, watchdog and exit codes; the Triton
sweep in Triton's interpreter, compiled for sm_90 offline, and launched on its tensor's GPU."""

import json
import os

import pytest
import torch

from zotune.cli import main


def test_a_triton_sweep_launches_on_the_tensors_gpu(monkeypatch):
    """--device cuda:1 in one process: the kernel is launched inside cuda:1's context, not the current GPU's."""
    from zotune.methods import triton_sweep

    pytest.importorskip("triton")
    entered = []

    class Device:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            entered.append(None)

    launched = []

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args, **kw: launched.append(entered[-1] if entered else "no device entered")

    class CudaTensor:
        device = torch.device("cuda", 1)

        def detach(self):
            return self

        def view(self, *shape):
            return torch.zeros(4)

    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(triton_sweep, "_kernels", lambda: (Launcher(), Launcher()))
    assert triton_sweep.signs_axpy(CudaTensor(), 3, 0, 1e-3)
    assert launched == [torch.device("cuda", 1)] and entered[-1] is None


def test_the_triton_kernels_compile_for_sm90_without_fused_multiply_adds():
    """Offline, no GPU: the sweeps compile to PTX for an H100 (sm_90) under every constexpr combination,
    with no fma where the CPU kernel rounds each product and sum apart (HiZOO's: one where torch's CPU
    addcmul_ fuses), and a key or offset of 1 stays a
    runtime value (Triton would specialise an integer 1 into a constant, which the kernel cannot take)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from zotune.methods import triton_sweep

    sweep, low_rank, hizoo_kernel = triton_sweep._kernels()
    assert {"n", "key", "first_word"} <= set(sweep.do_not_specialize)
    assert {"m", "n", "key_u", "key_v"} <= set(low_rank.do_not_specialize)
    terms = {"scale": "fp32", "decay": "fp32", "then": "fp32"}
    flags = {"SCALE": "constexpr", "DECAY": "constexpr", "THEN": "constexpr", "BLOCK": "constexpr"}
    kernels = [(sweep, {"p_ptr": "*fp32", "n": "i64", "key": "i64", "first_word": "i64", **terms, **flags}, {}),
               *[(low_rank, {"p_ptr": "*fp32", "m": "i64", "n": "i64", "key_u": "i64", "key_v": "i64", **terms,
                             "R": "constexpr", **flags}, {"R": r}) for r in (1, 2, 4)]]
    hizoo = {"p_ptr": "*fp32", "h_ptr": "*fp32", "n": "i64", "key": "i64", **terms, "alpha": "fp32",
             "curvature": "fp32", "floor": "fp32", "SCALE": "constexpr", "DECAY": "constexpr", "THEN": "constexpr",
             "HESSIAN": "constexpr", "BLOCK": "constexpr"}
    kernels += [(hizoo_kernel, hizoo, {"HESSIAN": h}) for h in (False, True)]
    for kernel, signature, fixed in kernels:
        for scale in (False, True):
            for decay in (False, True):
                for then in (False, True):
                    source = ASTSource(fn=kernel, signature=signature, constexprs={
                        **fixed, "SCALE": scale, "DECAY": decay, "THEN": then, "BLOCK": triton_sweep.BLOCK})
                    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                         options={"enable_fp_fusion": False}).asm["ptx"]
                    # HiZOO's p + c·s is one multiply-add on purpose (as torch's addcmul_ on the CPU)
                    assert ("fma" in ptx) == (kernel is hizoo_kernel and (scale or then)), (kernel, fixed, scale,
                                                                                             decay, then)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_gpu_check_runs_every_part_in_its_own_process_and_passes_on_the_cpu(tmp_path, capsys):
    """`zotune bench gpu` on tiny shapes: one JSON line per part in --out (and on stdout), each ok, the bitwise
    checks holding; the file is new (a user's file is never written)."""
    out = tmp_path / "check.jsonl"
    assert main(["bench", "gpu", "--device", "cpu", "--quick", "--repeats", "1", "--out", str(out)]) == 0
    got = {r["part"]: r for r in rows(out)}
    assert list(got) == ["directions", "streamed_equals_resident", "stress", "sensitivity", "memory", "step_time",
                         "tf32", "scale"]
    assert all(r["status"] == "ok" for r in got.values()), got
    assert got["directions"]["result"]["equal"] and got["directions"]["result"]["kernel"] == "eager"
    assert got["directions"]["result"]["methods"] == {"kernel": "eager", "lozo_equal": True, "hizoo_bits": "the CPU's"}
    assert set(got["streamed_equals_resident"]["result"]) == {
        f"{m}/{t}" for m in ("zosgd", "zoadam", "n_directions=2", "lozo") for t in ("cpu", "disk")}
    assert got["tf32"]["result"] == {"relative_grad_change": None, "tf32_step_time_ratio": None}  # CUDA only
    assert got["step_time"]["result"]["float32"]["matmul_precision"] == "highest"
    assert capsys.readouterr().out.count('"part": ') == 8
    sensitivity = got["sensitivity"]["result"]  # (on the CPU the "device" is the CPU: it must agree exactly)
    assert sensitivity["device_shares"] == 1.0 and sensitivity["streamed_equals_resident"] and sensitivity["entries"]
    assert "skipped" in got["stress"]["result"]  # CUDA only (the fake accelerator covers the CPU)
    assert main(["bench", "gpu", "--device", "cpu", "--quick", "--out", str(out)]) == 2  # exists: refused
    assert "exists and zotune did not write it" in capsys.readouterr().err


def test_a_part_that_raises_hangs_or_does_not_fit_the_budget_is_reported_and_the_others_still_run(tmp_path,
                                                                                               monkeypatch):
    """Exit 2 with the whole traceback of a part that raised, every thread's stack of a part that hung
    (the watchdog), and a skipped part when the budget left is below its estimate; the other parts' lines
    are there, each written as its part ended."""
    out = tmp_path / "raise.jsonl"
    monkeypatch.setenv("ZOTUNE_GPU_CHECK_FAULT", "directions:raise")
    assert main(["bench", "gpu", "--device", "cpu", "--quick", "--parts", "directions,tf32", "--out", str(out)]) == 2
    raised, after = rows(out)
    assert raised["status"] == "error" and "Traceback" in raised["traceback"]
    assert "directions forced to raise" in raised["traceback"] and after["status"] == "ok"
    out = tmp_path / "hang.jsonl"
    # (the part after the hang is tf32, which on a CPU only starts and reports: a loaded machine still
    # finishes it well inside the timeout that catches the hang)
    monkeypatch.setenv("ZOTUNE_GPU_CHECK_FAULT", "directions:hang")
    assert main(["bench", "gpu", "--device", "cpu", "--quick", "--parts", "directions,tf32", "--part-timeout", "60",
                 "--out", str(out)]) == 2
    hung, after = rows(out)
    assert hung["status"] == "timeout" and "Thread" in hung["traceback"] and "child" in hung["traceback"]
    assert after["status"] == "ok"
    out = tmp_path / "budget.jsonl"
    monkeypatch.delenv("ZOTUNE_GPU_CHECK_FAULT")
    assert main(["bench", "gpu", "--device", "cpu", "--quick", "--parts", "tf32,scale", "--budget", "12",
                 "--out", str(out)]) == 2
    ran, skipped = rows(out)
    assert ran["status"] == "ok" and skipped["status"] == "skipped" and "estimated 20s" in skipped["reason"]


def test_a_bitwise_part_that_does_not_hold_fails_the_check():
    from zotune.bench.gpu_parts import _holds

    assert _holds({"a/cpu": True, "b/disk": True}) and _holds({"values": 5, "equal": True, "kernel": "eager"})
    assert not _holds({"a/cpu": True, "b/disk": False}) and not _holds({"equal": True, "eager_equal": False})


_TRITON_CHECK = """
import torch
from zotune.methods import triton_sweep
from zotune.methods.perturb import Directions, direction_seed
eager = Directions("rademacher")
eager.fused = False
bad = []
for n in (1, 31, 64, 1000, 3 * 1024 + 77):
    for terms in [(1e-3, 1.0, 0.0), (-2e-3, 1.0, 0.0), (1e-3, 0.999, -3e-4), (0.0, 1.0, 0.37), (5e-4, 1.0, -2e-4)]:
        p = torch.randn(n, generator=torch.Generator().manual_seed(n))
        a, b = p.clone(), p.clone()
        eager.add(a, 7, 1, 3, *terms)
        triton_sweep.signs_axpy(b, direction_seed(7, 1, 3), 0, *terms)
        if not torch.equal(a, b) or torch.equal(b, p):
            bad.append((n, terms))
p = torch.randn(5000, generator=torch.Generator().manual_seed(1))  # a piece that starts at a later word
a, b = p.clone(), p.clone()
eager.add(a, 3, 0, 2, 1e-3)
triton_sweep.signs_axpy(b[:2048], direction_seed(3, 0, 2), 0, 1e-3)
triton_sweep.signs_axpy(b[2048:], direction_seed(3, 0, 2), 2048 // 64, 1e-3)
print("SAME" if not bad and torch.equal(a, b) else f"BAD {bad}")
"""


def _interpreted(script: str) -> str:
    """The last line `script` prints, run with Triton's interpreter (TRITON_INTERPRET=1, set before Triton
    is imported: a fresh process), which runs a kernel on CPU tensors."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_the_cuda_sweep_kernel_gives_the_cpu_bits_in_tritons_interpreter():
    """The Triton kernel a CUDA sweep takes == the eager path, bit for bit: moves, the fused restore +
    decay + update, sizes around the block and word boundaries, a piece starting mid-tensor."""
    assert _interpreted(_TRITON_CHECK) == "SAME"


_LOW_RANK_CHECK = """
import torch
from zotune.methods import make_optimizer, triton_sweep
from zotune.methods.zosgd import StepKey
triton_sweep.available = lambda p: p.dtype == torch.float32 and p.is_contiguous()  # the interpreter runs on CPU
launched, low_rank = [], triton_sweep.low_rank_axpy
triton_sweep.low_rank_axpy = lambda *a, **k: launched.append(1) or low_rank(*a, **k)
bad = []
for rank in (1, 2, 4):
    for shape in [(1, 1), (3, 5), (7, 1000), (33, 2049), (2, 3, 70)]:
        for terms in [(1e-3, 1.0, 0.0), (-2e-3, 1.0, 0.0), (1e-3, 0.999, -3e-4), (0.0, 1.0, 0.37)]:
            p = torch.randn(shape, generator=torch.Generator().manual_seed(rank))
            a, b = p.clone(), p.clone()
            eager, kernel = (make_optimizer("lozo", [x], seed=5, rank=rank, interval=3) for x in (a, b))
            eager._directions.fused = False
            for step in (0, 4):  # two windows of V
                key = StepKey(step, 1000 + step)
                eager.add_z(a, key, 1, 0, *terms)
                kernel.add_z(b, key, 1, 0, *terms)
            if not torch.equal(a, b) or (p.numel() > 1 and torch.equal(b, p)):  # (one value: ±z twice may cancel)
                bad.append((rank, shape, terms))
print("SAME" if not bad and len(launched) == 3 * 5 * 4 * 2 else f"BAD {bad} {len(launched)}")
"""


def test_the_cuda_low_rank_kernel_gives_lozos_cpu_bits_in_tritons_interpreter():
    """LOZO's one-launch kernel for a CUDA matrix (U and V made inside it from their counter words) ==
    LOZO's eager path (U and V drawn, Z by a matrix product, the three adds), bit for bit: ranks 1, 2
    and 4, moves and the fused restore + decay + update, rows and columns around the block and word
    boundaries, a tensor of three dimensions, two windows of V."""
    assert _interpreted(_LOW_RANK_CHECK) == "SAME"


def test_a_cuda_sweep_takes_the_triton_kernel_and_the_eager_reference_does_not():
    from zotune.methods import triton_sweep
    from zotune.methods.perturb import Directions

    pytest.importorskip("triton")

    class CudaLike:  # what the dispatch looks at, without a GPU
        def __init__(self, dtype, contiguous=True):
            self.device, self.dtype, self._contiguous = torch.device("cuda", 0), dtype, contiguous

        def is_contiguous(self):
            return self._contiguous

    assert triton_sweep.available(CudaLike(torch.float32))
    assert not triton_sweep.available(CudaLike(torch.bfloat16))
    assert not triton_sweep.available(CudaLike(torch.float32, False))
    assert not triton_sweep.available(torch.zeros(3))  # the CPU has its own kernel
    fused, eager, gaussian = Directions("rademacher"), Directions("rademacher"), Directions("gaussian")
    eager.fused = False
    assert fused._fused_on_device(CudaLike(torch.float32))
    assert not eager._fused_on_device(CudaLike(torch.float32))
    assert not gaussian._fused_on_device(CudaLike(torch.float32))



def test_a_triton_that_cannot_build_the_kernel_leaves_the_sweep_to_the_eager_path(monkeypatch):
    from zotune.methods import triton_sweep

    pytest.importorskip("triton")

    def cannot_build():
        raise RuntimeError("no such instruction")

    monkeypatch.setattr(triton_sweep, "_kernels", cannot_build)
    monkeypatch.setattr(triton_sweep, "_failed", None)
    p = torch.zeros(100)
    with pytest.warns(UserWarning, match="could not be built .*no such instruction.*eager path"):
        assert triton_sweep.signs_axpy(p, 5, 0, 1e-3) is False
    assert torch.equal(p, torch.zeros(100)) and triton_sweep._failed is not None


_HIZOO_CHECK = """
import torch
from zotune.methods import make_optimizer, triton_sweep
triton_sweep.available = lambda p: p.dtype == torch.float32 and p.is_contiguous()  # the interpreter runs on CPU
launched, kernel = [], triton_sweep.hessian_axpy
triton_sweep.hessian_axpy = lambda *a, **k: launched.append(1) or kernel(*a, **k)
bad = []
for shape in [(1,), (33,), (7, 1000), (3, 2049)]:
    for wd in (0.0, 0.1):
        p = torch.randn(shape, generator=torch.Generator().manual_seed(3))
        a, b = p.clone(), p.clone()
        eager, fused = (make_optimizer("hizoo", [x], seed=5, lr=1e-2, eps=1e-2, weight_decay=wd, hessian_smoothing=0.3)
                        for x in (a, b))
        eager._directions.fused = False
        for opt in (eager, fused):
            losses = iter([1.0, 1.3, 0.8, 1.1, 1.25, 0.9, 1.0, 1.2, 0.95])
            for _ in range(3):
                opt.step(lambda: torch.tensor(next(losses)))
        ha, hb = eager.tensor_state[0]["hessian"], fused.tensor_state[0]["hessian"]
        if not (torch.equal(a, b) and torch.equal(ha, hb)) or torch.equal(b, p) or torch.equal(hb, torch.ones_like(hb)):
            bad.append((shape, wd, float((a - b).abs().max()), float((ha - hb).abs().max())))
print("SAME" if not bad and len(launched) == 4 * 2 * 3 * 3 else f"BAD {bad} {len(launched)}")
"""


def test_the_cuda_hizoo_kernel_gives_the_cpu_bits_in_tritons_interpreter():
    """HiZOO's one-launch kernel (z, 1/√H, the move; the update of θ and of H) == HiZOO's eager path, bit
    for bit, over 3 steps with weight decay and without. The eager path's `p + c·z/√H` is one multiply-add
    where torch's CPU kernels use FMA (AVX2, AVX-512): without it the CPU rounds twice and only closeness
    can hold, and HiZOO claims that its runs depend on the device (`directions_depend_on_device`)."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip(f"this CPU's torch kernels ({torch.backends.cpu.get_cpu_capability()}) do not fuse multiply-adds")
    assert _interpreted(_HIZOO_CHECK) == "SAME"
