"""The randomized refresh's last step, before and after reducing the wide B = QᵀA by a QR.

For the Llama-7B shapes at rank 1024 (k = 1040 sketch columns), B is 1040 × n. Before: the left
singular vectors of B by ``torch.linalg.svd(B)``. After: Bᵀ = Q₂R, then ``svd(Rᵀ)`` (k × k), as
``galorex.projection.randomized_left_basis`` does now. Interleaved rounds in one process, medians;
also the whole ``randomized_left_basis`` (new code) per shape. Run:
``python docs/bench_refresh_reduction.py``.
"""

import statistics
import time

import torch

from galorex.projection import randomized_left_basis


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    for n in (4096, 11008):
        b = torch.randn(1040, n)
        old, new = [], []
        for _ in range(3):
            old.append(timed(lambda b=b: torch.linalg.svd(b, full_matrices=False)))
            new.append(timed(lambda b=b: torch.linalg.svd(torch.linalg.qr(b.mT).R.mT, full_matrices=False)))
        a = torch.randn(4096, n)
        whole = timed(lambda a=a: randomized_left_basis(a, 1024))
        o, w = statistics.median(old), statistics.median(new)
        print(
            f"B 1040x{n}: svd(B) {o:.2f} s, qr + svd(R) {w:.2f} s ({o / w:.1f}x); "
            f"whole randomized_left_basis of a 4096x{n} matrix: {whole:.2f} s"
        )


if __name__ == "__main__":
    main()
