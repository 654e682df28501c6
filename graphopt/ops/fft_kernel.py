"""The fused depthwise FFT convolution for TVM's CPU targets: one TIR loop nest per pair of channels,
every FFT level, twiddle and the spectrum product inside it, the data never leaving cache.

Two channels a, b travel as one complex signal z = x_a + i·x_b (the two-for-one trick: their spectra
are Z's Hermitian and anti-Hermitian parts), so one complex FFT of size N does the work of two real ones:
    Y[k] = Z[k]·P[k] + conj(Z[−k])·Q[k],   P = (H_a + H_b)/2N,  Q = (H_a − H_b)/2N
and y_a + i·y_b = N·IFFT(Y). Both FFTs are Stockham autosort (natural order in and out, no bit
reversal): radix 8 first, then radix 4 (one radix 2 where needed; see `plan`). Each stage loads and
stores float32x8 vectors along its contiguous index (q when the stride s ≥ 8, else p). The first stage
reads x itself (its zero padding costs nothing) and the last writes only the kept outputs, into y.

The kernel is TVMScript text built here and parsed: each stage's extents, strides and twiddle offsets
are Python constants. Values are bound once with `T.bind` (an SSA let): in TVM 0.27's tirx a plain
`v = expr` is a mutable local scalar — inside a vectorized loop it held the last lane's value, and a
vector one became a workspace allocation per value (670 per iteration, 64×4096: 1.95 → 0.93 ms)."""
from __future__ import annotations

import math
from functools import cache

import numpy as np

LANES = 8          # fp32 lanes of one AVX2 vector; NEON splits it in two


def plan(n: int) -> list[int]:
    """The radix of each Stockham stage of an n-point FFT: radix 8 first (its stride is 1, so it alone has
    scattered stores), then radix 4, and one radix 2 where log2 n − 3 is odd."""
    bits = int(math.log2(n)) - 3
    return [8] + [2] * (bits % 2) + [4] * (bits // 2)


def stages(n: int) -> list[tuple[int, int, int]]:
    """(radix, sub-transform length, stride) of each stage."""
    out, s = [], 1
    for radix in plan(n):
        out.append((radix, n, s))
        n, s = n // radix, s * radix
    return out


@cache
def twiddles(n: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """Each stage's twiddles ω_len^(j·p), j = 1…radix−1, as [re(p), im(p)] runs; and each stage's offset."""
    runs, offsets, size = [], [], 0
    for radix, length, _ in stages(n):
        offsets.append(size)
        p = np.arange(length // radix)
        for j in range(1, radix):
            runs.append(np.concatenate([np.cos(2 * np.pi * j * p / length), -np.sin(2 * np.pi * j * p / length)]))
            size += len(runs[-1])
    return np.concatenate(runs).astype(np.float32), tuple(offsets)


def pair_spectra(h_full: np.ndarray) -> np.ndarray:
    """Kernels' full N-point spectra [C, N] (C even) → the pointwise constants [C/2, 4 (P re/im, Q re/im), N]."""
    n = h_full.shape[-1]
    a, b = h_full[0::2] / n, h_full[1::2] / n
    p, q = (a + b) / 2, (a - b) / 2
    return np.stack([p.real, p.imag, q.real, q.imag], 1).astype(np.float32)


def _vec(c: float) -> str:
    return f"T.broadcast(T.float32({c!r}), {LANES})"


class _Script:
    """TVMScript lines under construction. Values are float32x8 lets (SSA: each loaded and computed once)."""

    def __init__(self):
        self.lines: list[str] = []
        self.indent = 0
        self.fresh = 0

    def emit(self, line: str) -> None:
        self.lines.append(" " * self.indent + line)

    def let(self, expr: str) -> str:
        self.fresh += 1
        self.emit(f"v{self.fresh} = T.bind({expr})")
        return f"v{self.fresh}"

    def dft(self, xs: list[tuple[str, str]], sign: int) -> list[tuple[str, str]]:
        """The DFT of complex values xs (len a power of two), as radix-2 splits down to single values:
        X[k] = E[k] + ω^k·O[k], X[k + r/2] = E[k] − ω^k·O[k], ω = exp(∓2πi/r); sign −1 is the inverse."""
        r = len(xs)
        if r == 1:
            return xs
        even, odd = self.dft(xs[0::2], sign), self.dft(xs[1::2], sign)
        out: list = [None] * r
        for k in range(r // 2):
            (er, ei), (orr, oi) = even[k], odd[k]
            c, s = math.cos(2 * math.pi * k / r), -sign * math.sin(2 * math.pi * k / r)
            if k == 0:
                tr, ti = orr, oi
            elif 4 * k == r:                # ω = ∓j
                tr, ti = (self.let(f"{_vec(0.0)} - {oi}"), orr) if s > 0 else (oi, self.let(f"{_vec(0.0)} - {orr}"))
            else:
                tr = self.let(f"{_vec(c)} * {orr} - {_vec(s)} * {oi}")
                ti = self.let(f"{_vec(c)} * {oi} + {_vec(s)} * {orr}")
            out[k] = (self.let(f"{er} + {tr}"), self.let(f"{ei} + {ti}"))
            out[k + r // 2] = (self.let(f"{er} - {tr}"), self.let(f"{ei} - {ti}"))
        return out


def source(batch, channels: int, length: int, n: int, start: int, out_len: int, name: str = "fft_conv1d_dw") -> str:
    """TVMScript of `name(x [B, C, L], pq [C/2, 4, N], tw, y [B, C, out_len])`, C even; `batch` an int, or
    None for a batch size given at run time."""
    assert channels % 2 == 0 and n >= 64 and length <= n and start + out_len <= n
    tw, offsets = twiddles(n)
    pairs, lanes, steps = channels // 2, LANES, stages(n)
    b_dim = "B" if batch is None else str(batch)
    ramp = lambda base, stride=1: f"T.ramp({base}, {stride}, {lanes})"   # noqa: E731
    sc = _Script()
    sc.emit("@T.prim_func")
    sc.emit(f"def {name}(x_h: T.handle, pq: T.Buffer(({pairs}, 4, {n}), 'float32'), "
            f"tw: T.Buffer(({len(tw)},), 'float32'), y_h: T.handle):")
    sc.indent = 4
    sc.emit(f"T.func_attr({{'global_symbol': '{name}', 'tir.noalias': True, 'tirx.is_scheduled': True}})")
    if batch is None:
        sc.emit("B = T.int64()")
    sc.emit(f"x = T.match_buffer(x_h, ({b_dim}, {channels}, {length}), 'float32')")
    sc.emit(f"y = T.match_buffer(y_h, ({b_dim}, {channels}, {out_len}), 'float32')")
    sc.emit(f"for bc in T.parallel({b_dim} * {pairs}):")
    sc.indent = 8
    sc.emit(f"U = T.decl_buffer((2, {n}), 'float32')")
    sc.emit(f"V = T.decl_buffer((2, {n}), 'float32')")
    sc.emit(f"c = T.meta_var(bc % {pairs})")
    sc.emit(f"b = T.meta_var(bc // {pairs})")
    # the last stage stores straight into y when every kept run starts and ends on a vector boundary
    direct = start % lanes == 0 and out_len % lanes == 0

    def x_at(plane, lo, hi):                # x over [lo, hi) in p-vectors, or its zero padding
        if lo >= length:
            return _vec(0.0)
        if hi <= length:
            return f"x[b, c * 2 + {plane}, {ramp(f'p + {lo}')}]"
        i = ramp(f"p + {lo}")
        return (f"T.Select({i} < T.broadcast({length}, {lanes}), "
                f"x[b, c * 2 + {plane}, T.min({i}, T.broadcast({length - 1}, {lanes}))], {_vec(0.0)})")

    def fft(src: str, dst: str, inverse: bool) -> None:
        """Stockham stages src → dst → src …: the forward FFT reads x, the inverse writes y."""
        sign = -1 if inverse else 1        # the inverse: conjugate twiddles
        bufs = [src, dst]
        for i, ((radix, size, s), off) in enumerate(zip(steps, offsets)):
            m, a, out = size // radix, bufs[i % 2], bufs[(i + 1) % 2]
            first, last = i == 0 and not inverse, i == len(steps) - 1 and inverse
            if s >= lanes:                  # vectors along q: contiguous in and out, one twiddle per p
                sc.emit(f"for p, qo in T.grid({m}, {s // lanes}):")
                sc.indent += 4
                sc.emit(f"q = T.meta_var(qo * {lanes})")
                load = lambda plane, j: f"{a}[{plane}, {ramp(f'q + {s} * (p + {j * m})')}]"   # noqa: E731
                twid = lambda at: f"T.broadcast(tw[{at} + p], {lanes})"                         # noqa: E731
                at_out = lambda k: ramp(f"q + {s} * ({radix} * p + {k})")                       # noqa: E731
            else:                           # s = 1, vectors along p: contiguous in, scattered out
                assert s == 1 and m % lanes == 0
                sc.emit(f"for po in range({m // lanes}):")
                sc.indent += 4
                sc.emit(f"p = T.meta_var(po * {lanes})")
                load = lambda plane, j: f"{a}[{plane}, {ramp(f'p + {j * m}')}]"                # noqa: E731
                twid = lambda at: f"tw[{ramp(f'{at} + p')}]"                                    # noqa: E731
                at_out = lambda k: ramp(f"{radix} * p + {k}", radix)                            # noqa: E731
            xs = [(x_at(0, j * m, (j + 1) * m), x_at(1, j * m, (j + 1) * m)) if first else (load(0, j), load(1, j))
                  for j in range(radix)]
            xs = [(sc.let(re), sc.let(im)) for re, im in xs]
            for k, (re, im) in enumerate(sc.dft(xs, sign)):
                if k:                       # × ω_size^(k·p)
                    wr = sc.let(twid(off + 2 * (k - 1) * m))
                    wi = sc.let(twid(off + 2 * (k - 1) * m + m) + ("" if sign > 0 else f" * {_vec(-1.0)}"))
                    re, im = sc.let(f"{re} * {wr} - {im} * {wi}"), sc.let(f"{re} * {wi} + {im} * {wr}")
                if not (last and direct):
                    sc.emit(f"{out}[0, {at_out(k)}] = {re}")
                    sc.emit(f"{out}[1, {at_out(k)}] = {im}")
                    continue
                # the last stage (p = 0): output idx = q + s·k, kept if in [start, start + out_len)
                lo, hi = max(0, start - s * k), min(s, start + out_len - s * k)
                if lo >= hi:
                    continue
                partial = (lo, hi) != (0, s)  # a partly kept run (start or length off the stride)
                if partial:
                    sc.emit(f"if {lo} <= q and q < {hi}:")
                    sc.indent += 4
                sc.emit(f"y[b, c * 2, {ramp(f'q + {s * k - start}')}] = {re}")
                sc.emit(f"y[b, c * 2 + 1, {ramp(f'q + {s * k - start}')}] = {im}")
                if partial:
                    sc.indent -= 4
            sc.indent -= 4
        if inverse and not direct:          # copy the kept outputs from the last stage's buffer
            res = bufs[len(steps) % 2]
            sc.emit(f"for t, plane in T.grid({out_len}, 2):")
            sc.emit(f"    y[b, c * 2 + plane, t] = {res}[plane, t + {start}]")

    fft("U", "V", inverse=False)
    z, w = ("U", "V") if len(steps) % 2 == 0 else ("V", "U")
    # Y = Z·P + conj(Z[−k])·Q: k = 0…7 by scalars (Z[−0] = Z[0]), then vectors with Z[−k] loaded reversed
    sc.emit(f"for k in range({lanes}):")
    sc.emit(f"    {w}[0, k] = {z}[0, k] * pq[c, 0, k] - {z}[1, k] * pq[c, 1, k] + {z}[0, ({n} - k) % {n}] * pq[c, 2, k]"
            f" + {z}[1, ({n} - k) % {n}] * pq[c, 3, k]")
    sc.emit(f"    {w}[1, k] = {z}[0, k] * pq[c, 1, k] + {z}[1, k] * pq[c, 0, k] + {z}[0, ({n} - k) % {n}] * pq[c, 3, k]"
            f" - {z}[1, ({n} - k) % {n}] * pq[c, 2, k]")
    sc.emit(f"for ko in range(1, {n // lanes}):")
    sc.indent += 4
    sc.emit(f"k = T.meta_var(ko * {lanes})")
    rev = list(range(lanes - 1, -1, -1))
    zr, zi = sc.let(f"{z}[0, {ramp('k')}]"), sc.let(f"{z}[1, {ramp('k')}]")
    cr = sc.let(f"T.Shuffle([{z}[0, {ramp(f'{n - lanes + 1} - k')}]], {rev})")
    ci = sc.let(f"{_vec(0.0)} - T.Shuffle([{z}[1, {ramp(f'{n - lanes + 1} - k')}]], {rev})")
    pr, pi, qr, qi = (sc.let(f"pq[c, {j}, {ramp('k')}]") for j in range(4))
    sc.emit(f"{w}[0, {ramp('k')}] = {zr} * {pr} - {zi} * {pi} + {cr} * {qr} - {ci} * {qi}")
    sc.emit(f"{w}[1, {ramp('k')}] = {zr} * {pi} + {zi} * {pr} + {cr} * {qi} + {ci} * {qr}")
    sc.indent -= 4
    fft(w, z, inverse=True)
    return "\n".join(sc.lines)


def prim_func(batch, channels: int, length: int, n: int, start: int, out_len: int, name: str = "fft_conv1d_dw"):
    from tvm.script import tirx as T
    from tvm.script.parser.core.entry import parse
    return parse(source(batch, channels, length, n, start, out_len, name), extra_vars={"T": T})
