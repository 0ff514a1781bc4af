"""The package imports and its pure-PyTorch paths work when the compiled extension is absent."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc
    import sys


    class HideExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "elogitnorm_fast._C":
                raise ImportError("hidden for this test")
            return None


    sys.meta_path.insert(0, HideExtension())
    import torch

    import elogitnorm_fast as ef
    from elogitnorm_fast import scoring
    from elogitnorm_fast.reference import elogitnorm_reference

    names = ef.available_backends("cpu")
    assert "cpu" not in names and {"torch", "reference"} <= set(names), names
    assert "not built" in ef.unavailable_reason("cpu"), ef.unavailable_reason("cpu")
    assert ef.resolve_backend("auto", torch.device("cpu")).NAME == "torch"
    for op in ("logit_scores", "knn"):
        assert ef.available_backends("cpu", op=op) == ["torch"], op
        assert ef.unavailable_reason("cpu", op=op) == ef.unavailable_reason("cpu"), op
        assert ef.resolve_backend("auto", "cpu", op=op).NAME == "torch", op
    assert scoring.resolve_backend(torch.randn(2, 3)) == "torch"
    logits, weight = torch.randn(9, 5, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    target = torch.randint(0, 5, (9,))
    torch.testing.assert_close(ef.elogitnorm_loss(logits, weight, target),
                               elogitnorm_reference(logits, weight, target))
    scores = scoring.logit_scores(logits.float(), ("msp", "energy"))
    torch.testing.assert_close(scores["energy"], torch.logsumexp(logits.float(), dim=1))
    # msp is the log-odds of the top class: its sigmoid is the maximum softmax probability.
    torch.testing.assert_close(torch.sigmoid(scores["msp"]),
                               logits.float().softmax(dim=1).amax(dim=1))
    bank, queries = torch.randn(20, 3), torch.randn(4, 3)
    knn = scoring.KNNScorer(k=2).fit(bank)
    normalize = torch.nn.functional.normalize
    kth = torch.cdist(normalize(queries.double(), dim=1), normalize(bank.double(), dim=1))
    torch.testing.assert_close(knn.score(queries).double(), -kth.sort(dim=1).values[:, 1],
                               rtol=1e-5, atol=1e-4)
    from elogitnorm_fast import info

    details = info.collect()
    assert details["knn_cpu_kernels"] == [], details
    assert "knn_cpu_kernels: none (no _C)" in info.render(details)
    assert "elogitnorm_fast._C" not in sys.modules
    print("ok")
    """
)


def test_pure_pytorch_paths_work_without_the_compiled_extension():
    # No compiling on first use either: the library is absent for good in this process.
    env = dict(os.environ, ELOGITNORM_FAST_JIT="0")
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
