"""Benchmarks: ``python -m galorex.bench {step,refresh,memory,train-reference} --help``.

Every comparison runs side by side in one process and reports ratios, since these machines are
noisy; absolute times mean something only on a quiet GPU machine.
"""
