"""pytest-benchmark files for the same cases as `python -m latentfast bench` (quick sizes).

Run with timings: pytest benchmarks --benchmark-enable. Under plain pytest (and CI) the
benchmark fixture runs each callable once, which checks the cases still run and agree.
"""
from __future__ import annotations

import pytest
import torch

from latentfast.bench.cases import make_cases

CASES = make_cases(torch.device("cpu"), quick=True)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.name} {'+'.join(c.passes)}" for c in CASES])
@pytest.mark.parametrize("impl", ["eager", "latentfast"])
def test_case(benchmark, case, impl):
    fn = case.eager if impl == "eager" else case.fast
    with torch.no_grad():
        outs = benchmark(fn, *case.inputs)
        want = case.eager(*case.inputs)
    for got, ref in zip(outs, want):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
