"""qtrain.triton_kernels against the PyTorch code they replace (transformers' LlamaRMSNorm, silu(gate) * up, and
autograd's gradients of both), run on the CPU through Triton's interpreter.

The kernels do the same fp32 operations with the same roundings as torch, so in 16 bits they must agree bit for
bit almost everywhere (>= 99%), and elsewhere differ by one last bit of a 16-bit rounding: only rsqrt/exp
implementations and the order of a row's sum differ. fp32 results are compared with tolerances justified where
they are used.

The kernels run in a child process started with TRITON_INTERPRET=1 (this file as a script, `kernel_outputs`):
the interpreter must be on when Triton is first imported, because Triton's own tl.sum & co. are @triton.jit
functions too, and a pytest run has usually imported Triton by the time it reaches this file (transformers and
bitsandbytes import it); setting it in this process would also send every later Triton kernel of the run to
the interpreter. The child saves the kernels' outputs; the tests here compute the references and compare.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from qtrain import triton_kernels as tk

triton = pytest.importorskip("triton")

EPS = 1e-5
LOW = (torch.bfloat16, torch.float16)
ROWS = [(1, 64), (7, 100), (37, 4096)]  # (N, H): a single row, odd N with a non-power-of-two H, a real hidden size
# (x dtype, weight dtype): the same, and mixed (fp32 y with a bf16 x; fp16 x with a bf16 weight -> fp32 y)
RMS_DTYPES = [(d, d) for d in (*LOW, torch.float32)]
RMS_DTYPES += [(torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16)]
SWIGLU_SHAPES = [(3, 5, 100), (37, 1000)]  # 1500 elements (one partial block), 37 000 (37 blocks, the last partial)


def _name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


RMS_CASES = {f"{n}x{h}-{_name(d)}-w{_name(w)}": (n, h, d, w) for n, h in ROWS for d, w in RMS_DTYPES}
SWIGLU_CASES = {f"{'x'.join(map(str, s))}-{_name(d)}": (s, d) for s in SWIGLU_SHAPES for d in (*LOW, torch.float32)}


def rms_inputs(n: int, h: int, dtype: torch.dtype, wdtype: torch.dtype):
    """x (N, H), weight (H,), and y's gradient, seeded: the child and the tests make the same ones."""
    gen = torch.Generator().manual_seed(n * h)
    # Row scales from 1e-3 (where eps = 1e-5 outweighs mean(x²) ~ 1e-6) to 10.
    scale = torch.logspace(-3, 1, n)[:, None]
    x = ((torch.randn(n, h, generator=gen) + 0.2) * scale).to(dtype)
    w = (1 + 0.2 * torch.randn(h, generator=gen)).to(wdtype)
    gy = torch.randn(n, h, generator=gen).to(torch.promote_types(dtype, wdtype))
    return x, w, gy


def swiglu_inputs(shape: tuple, dtype: torch.dtype):
    """gate, up and the output's gradient, seeded."""
    gen = torch.Generator().manual_seed(len(shape))
    gate = torch.randn(shape, generator=gen) * 4
    # Saturation (exp(100) is inf in fp32), ±0, and the zero of silu's derivative (gate ≈ -1.2785).
    gate.view(-1)[:8] = torch.tensor([-100.0, -30.0, -1.2785, 0.0, -0.0, 1e-3, 30.0, 100.0])
    up, gy = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    return gate.to(dtype), up.to(dtype), gy.to(dtype)


# ------------------------------------------------------------------------------------------------ the child


def _round_bf16_to_nearest_even() -> None:
    """Triton's interpreter truncates fp32 -> bf16 (its `_convert_float` gets no rounding mode); the GPU rounds
    to nearest even (LLVM fptrunc, PTX cvt.rn), as torch does. Make the interpreter convert as torch does."""
    import triton.language as tl
    from triton.runtime import interpreter

    convert = interpreter._convert_float

    def rtne(data, src, dst, rounding_mode):
        if src == tl.float32 and dst == tl.bfloat16:
            t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16)
            return t.view(torch.int16).numpy().view(np.uint16)
        return convert(data, src, dst, rounding_mode)

    interpreter._convert_float = rtne


def run_kernels() -> dict[str, tuple]:
    """Every case's kernel outputs (in the child, TRITON_INTERPRET=1)."""
    assert os.environ.get("TRITON_INTERPRET") == "1" and triton.knobs.runtime.interpret
    _round_bf16_to_nearest_even()
    out = {}
    for key, case in RMS_CASES.items():
        x, w, gy = rms_inputs(*case)
        y, rstd = tk.rms_norm_forward(x, w, EPS)
        out[key] = (y, rstd, tk.rms_norm_backward(gy, x, rstd, w))
    with np.errstate(over="ignore"):  # numpy's exp(100) in fp32: inf, as on the GPU and in torch
        for key, case in SWIGLU_CASES.items():
            gate, up, gy = swiglu_inputs(*case)
            out[key] = (tk.swiglu_forward(gate, up), *tk.swiglu_backward(gy, gate, up))
    return out


def _child_env(**extra: str) -> dict[str, str]:
    """A child's environment: this checkout's qtrain first on the path, whatever is installed."""
    path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path)), **extra}


@pytest.fixture(scope="module")
def kernel_outputs(tmp_path_factory) -> dict[str, tuple]:
    """run_kernels() in a child process started with TRITON_INTERPRET=1 (module docstring)."""
    path = tmp_path_factory.mktemp("triton_kernels") / "outputs.pt"
    proc = subprocess.run([sys.executable, __file__, str(path)], env=_child_env(TRITON_INTERPRET="1"),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"the interpreter child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(path)


# ------------------------------------------------------------------------------------------------ checking


def ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype` at |ref| (one unit in the last place), in fp64."""
    fi = torch.finfo(dtype)
    _, e = torch.frexp(ref.double())  # |ref| = m * 2**e, 0.5 <= m < 1
    spacing = torch.where(ref == 0, 0.0, fi.eps * torch.exp2(e.double() - 1))
    return spacing.clamp_min(fi.smallest_normal * fi.eps)  # subnormals' spacing at the bottom


def assert_matches(out: torch.Tensor, ref: torch.Tensor, rounding: torch.dtype, product: bool = False,
                   atol: float = 0.0) -> None:
    """`out` is `ref` up to the last bit of the 16-bit rounding `rounding`, and bit-identical in >= 99% of the
    elements. Off by at most one unit in the last place (relative 2**-8..2**-7 in bf16, 2**-11..2**-10 in fp16)
    plus `atol`; or, for a `product` of a rounded 16-bit intermediate (n = x·rstd, silu(gate)) with another
    factor, 2 * eps * |ref|: the intermediate's last bit may flip (rstd's, exp's last fp32 bits decide a tie),
    which moves the product by |factor| * ulp(intermediate) <= eps * |ref|, plus the product's own rounding."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    diff = (out.double() - ref.double()).abs()
    eps = torch.finfo(rounding).eps
    bound = 2 * eps * ref.double().abs() if product else ulp(ref, rounding)
    bad = diff > bound + atol
    assert not bad.any(), f"{int(bad.sum())} elements off by more than the bound: {out[bad][:5]} vs {ref[bad][:5]}"
    bits = torch.int16 if out.itemsize == 2 else torch.int32
    same = (out.view(bits) == ref.view(bits)).double().mean().item()
    assert same >= 0.99, f"only {same:.2%} bit-identical"
    print(f"{out.dtype}: max diff {diff.max().item():.3g} ({(diff / ulp(ref, rounding)).max().item():.2f} ulp of "
          f"{_name(rounding)}), {same:.3%} bit-identical")


def llama_rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm.forward."""
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# ------------------------------------------------------------------------------------------------ RMSNorm


@pytest.mark.parametrize("key", RMS_CASES)
def test_rms_norm_forward(kernel_outputs, key):
    """y equals LlamaRMSNorm's output (dtype promote(w, x)); rstd equals torch's fp32 rsqrt(mean(x²) + eps)."""
    n, h, dtype, wdtype = RMS_CASES[key]
    x, w, _ = rms_inputs(n, h, dtype, wdtype)
    y, rstd, _ = kernel_outputs[key]
    # The sum's order and rsqrt's last bit: a few fp32 ulps.
    torch.testing.assert_close(rstd, torch.rsqrt(x.float().pow(2).mean(-1) + EPS), rtol=1e-6, atol=0)
    # Given its rstd, the rest is the module's elementwise formula: exactly torch's result.
    own = w * (x.float() * rstd[:, None]).to(dtype)
    assert y.dtype == own.dtype and torch.equal(y.view(torch.int32 if y.itemsize == 4 else torch.int16),
                                                own.view(torch.int32 if y.itemsize == 4 else torch.int16))
    ref = llama_rms_norm(x, w, EPS)
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-6, atol=0)  # only rstd differs: relative, on every element
    else:
        assert_matches(y, ref, dtype, product=True)


@pytest.mark.parametrize("key", RMS_CASES)
def test_rms_norm_backward(kernel_outputs, key):
    """gx equals autograd's gradient of x through LlamaRMSNorm (the weight frozen)."""
    n, h, dtype, wdtype = RMS_CASES[key]
    x, w, gy = rms_inputs(n, h, dtype, wdtype)
    gx = kernel_outputs[key][2]
    xr = x.clone().requires_grad_()
    (ref,) = torch.autograd.grad(llama_rms_norm(xr, w, EPS), xr, gy)
    # gx = rstd*g - x*rstd³*mean(g*x): the two terms cancel in places, so their fp32 rounding errors (~1e-7 of
    # the terms, whose size is that of the largest gradients) are absolute there, not relative.
    atol = 1e-6 * ref.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(gx, ref, rtol=1e-5, atol=atol)
    else:
        assert_matches(gx, ref, dtype, atol=atol)


def test_rms_norm_limits():
    """Empty inputs launch nothing; a row longer than a program's block is refused."""
    y, rstd = tk.rms_norm_forward(torch.ones(0, 8), torch.ones(8), EPS)
    assert y.shape == (0, 8) and rstd.shape == (0,)
    assert tk.rms_norm_backward(torch.ones(0, 8), torch.ones(0, 8), rstd, torch.ones(8)).shape == (0, 8)
    with pytest.raises(ValueError, match="hidden size"):
        tk.rms_norm_forward(torch.ones(1, 65537), torch.ones(65537), EPS)


# ------------------------------------------------------------------------------------------------ SwiGLU


@pytest.mark.parametrize("key", SWIGLU_CASES)
def test_swiglu_forward(kernel_outputs, key):
    """out equals silu(gate) * up."""
    shape, dtype = SWIGLU_CASES[key]
    gate, up, _ = swiglu_inputs(shape, dtype)
    out, ref = kernel_outputs[key][0], F.silu(gate) * up
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)  # exp's last bit: a few fp32 ulps, relative
    else:
        assert_matches(out, ref, dtype, product=True)


@pytest.mark.parametrize("key", SWIGLU_CASES)
def test_swiglu_backward(kernel_outputs, key):
    """(g_gate, g_up) equal autograd's gradients of silu(gate) * up."""
    shape, dtype = SWIGLU_CASES[key]
    gate, up, gy = swiglu_inputs(shape, dtype)
    g_gate, g_up = kernel_outputs[key][1:]
    gr, ur = gate.clone().requires_grad_(), up.clone().requires_grad_()
    ref_gate, ref_up = torch.autograd.grad(F.silu(gr) * ur, (gr, ur), gy)
    # 1 + gate*(1 - sigmoid) crosses zero near gate = -1.2785: there exp's last bit is absolute, ~1e-7 of g_s.
    atol = 1e-6 * ref_gate.abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(g_up, ref_up, rtol=1e-6, atol=0)  # gy * silu(gate): exp's last bit
        torch.testing.assert_close(g_gate, ref_gate, rtol=1e-6, atol=atol)
    else:
        assert_matches(g_up, ref_up, dtype, product=True)  # gy * silu(gate)
        assert_matches(g_gate, ref_gate, dtype, atol=atol)  # g_s is exact; sigmoid's fp32 last bits


def test_swiglu_empty():
    assert tk.swiglu_forward(torch.ones(0, 4), torch.ones(0, 4)).shape == (0, 4)
    assert all(g.shape == (0, 4) for g in tk.swiglu_backward(*(torch.ones(0, 4),) * 3))


# ------------------------------------------------------------------------------------------------ importing


def test_imports_without_triton():
    """The module imports, defines no kernel, and reports Triton unavailable when Triton cannot be imported."""
    code = ("import sys; sys.modules['triton'] = None\n"  # makes `import triton` raise ImportError
            "import qtrain.triton_kernels as tk\n"
            "assert not tk.available() and tk._kernels.cache_info().currsize == 0\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=_child_env())
    assert tk.available()


# ------------------------------------------------------------------------------------------------ in training


def fused_step() -> dict:
    """One bf16 training step of a tiny 4-bit Llama (LoRA on every linear, checkpointing) on the plain path, then
    with `training.fused_ops` on the Triton path (in the child: the interpreter runs the kernels on the CPU),
    counting the kernels' calls: `qtrain.fused`'s autograd functions around the kernels, in a real step."""
    import collections
    import tempfile

    from accelerate import Accelerator

    from conftest import make_llama_folder
    from qtrain import fused
    from qtrain.modeling import enable_checkpointing
    from qtrain.train import accumulate_gradients
    from test_fused_ops import _lora_model

    model, params = _lora_model(make_llama_folder(Path(tempfile.mkdtemp()), tie=False, layers=2), "bfloat16")
    enable_checkpointing(model)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}

    def step():
        for p in params.values():
            p.grad = None
        loss, _ = accumulate_gradients(model, [batch], accelerator, 1024)
        return loss, {n: p.grad.clone() for n, p in params.items()}

    plain = step()
    calls = collections.Counter()
    for name in ("rms_norm_forward", "rms_norm_backward", "swiglu_forward", "swiglu_backward"):
        def counted(*args, _f=getattr(tk, name), _name=name):
            calls[_name] += 1
            return _f(*args)
        setattr(tk, name, counted)
    fused.enable_fused_ops(model)
    with np.errstate(over="ignore"):
        triton_step = step()
    return {"backend": fused.backend_name(torch.device("cpu")), "calls": dict(calls), "plain": plain,
            "triton": triton_step}


def test_fused_ops_on_the_triton_path_train_like_the_plain_path(kernel_outputs):
    """In a real bf16 step the Triton path runs every norm and MLP through the kernels (5 norms and 2 MLPs, the
    checkpointed layers' forward twice; the first layer's input norm needs no backward: nothing upstream
    trains) and gives the plain path's loss and LoRA gradients up to the kernels' last-bit differences."""
    r = kernel_outputs["fused_step"]
    assert r["backend"] == "triton"
    assert r["calls"] == {"rms_norm_forward": 2 * 4 + 1, "rms_norm_backward": 4, "swiglu_forward": 2 * 2,
                          "swiglu_backward": 2}
    (ref_loss, ref), (loss, got) = r["plain"], r["triton"]
    assert abs(loss - ref_loss) <= 1e-3 * abs(ref_loss)
    for n in ref:
        gap = ((got[n] - ref[n]).abs().max() / ref[n].abs().max()).item()
        print(f"{n}: max gap {gap:.2e} of the largest gradient")
        assert gap < 2e-2, (n, gap)  # bf16 activations: a flipped last bit (2**-8) here and there, propagated
        assert torch.corrcoef(torch.stack([got[n].flatten(), ref[n].flatten()]))[0, 1] > 0.999


if __name__ == "__main__":  # the child of `kernel_outputs`
    torch.save({**run_kernels(), "fused_step": fused_step()}, sys.argv[1])
