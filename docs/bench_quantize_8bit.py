"""Time 8-bit moment quantisation with the exact table (default) against torch.bucketize.

Both paths in one process, interleaved round by round on the same tensors (the 7B moments'
shapes at rank 1024: 1024×11008 and 1024×4096 float32; m ~ N(0, 1), v = m²), checking every round
that the bytes are equal. Prints the median seconds of each path and their ratio, for the index
step alone (u → index, what bucketize did) and for the whole ``pack_moment``.
Run: ``python docs/bench_quantize_8bit.py`` (about a minute and 1 GiB on a 2-core CPU).
"""

import statistics
import time

import torch

from galorex.optim import state8bit as s8
from galorex.optim.code_lut import lut_bucketize

ROUNDS = 7


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {ROUNDS} interleaved rounds")
    print("| tensor | step | bucketize, s | table, s | ratio |")
    print("| --- | --- | ---: | ---: | ---: |")
    for shape in ((1024, 11008), (1024, 4096)):
        m = torch.randn(shape)
        for kind, x in ((s8.SIGNED, m), (s8.UNSIGNED_SQRT, m * m)):
            keep = kind == s8.UNSIGNED_SQRT
            code = s8.signed_code() if not keep else s8.unsigned_code()
            s = x if not keep else x.sqrt()
            blocks = s.view(-1, s8.BLOCK_SIZE)
            u = blocks / blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)[:, None]
            boundaries, lut = s8._boundaries_for(code, keep)
            steps = {
                "u → index": (
                    lambda u=u, b=boundaries: torch.bucketize(u, b, out_int32=True, right=True).to(torch.uint8),
                    lambda u=u, lut=lut: lut_bucketize(u, lut),
                ),
                "pack_moment": (lambda x=x, kind=kind: s8.pack_moment(x, kind)["q"],) * 2,
            }
            for step, (ref_fn, fast_fn) in steps.items():
                t_ref, t_fast = [], []
                for _ in range(ROUNDS):
                    s8._USE_LUT = False
                    t, q_ref = _timed(ref_fn)
                    t_ref.append(t)
                    s8._USE_LUT = True
                    t, q_fast = _timed(fast_fn)
                    t_fast.append(t)
                    if not torch.equal(q_ref, q_fast):
                        raise AssertionError(f"{shape} {kind} {step}: the table and bucketize differ")
                r, f = statistics.median(t_ref), statistics.median(t_fast)
                name = f"{'m' if not keep else 'v'} {shape[0]}×{shape[1]}"
                print(f"| {name} | {step} | {r:.3f} | {f:.3f} | {r / f:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
