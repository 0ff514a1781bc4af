"""The library needs torch and numpy only: tqdm (progress bars) is optional, and bars never go
to a log that is not a terminal unless asked for."""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap

from elogitnorm_fast.progress import progress_bar


def test_library_works_without_tqdm():
    code = textwrap.dedent(
        """
        import sys
        sys.modules["tqdm"] = None
        import torch
        import elogitnorm_fast as ef
        from elogitnorm_fast import metrics, scoring
        bank, queries = torch.randn(40, 3), torch.randn(5, 3)
        knn = scoring.KNNScorer(k=3, progress=True).fit(bank)
        assert knn.score(queries).shape == (5,)
        z = torch.randn(6, 4)
        ef.elogitnorm_loss(z, torch.randn(4, 2), torch.randint(0, 4, (6,)), backend="torch")
        print(metrics.auroc(torch.tensor([1.0, 2.0]), torch.tensor([0.0])))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "1.0"


def test_bars_only_when_asked_or_large_on_a_terminal():
    items = [1, 2, 3]
    # pytest captures stderr, so it is not a terminal: large work shows no bar by default.
    assert progress_bar(items, show=None, large=True) is items
    assert progress_bar(items, show=False, large=True) is items
    shown = progress_bar(items, show=True, large=False, file=io.StringIO())
    assert shown is not items and list(shown) == items


def test_import_without_triton_prints_nothing():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import elogitnorm_fast, elogitnorm_fast.scoring, elogitnorm_fast.knn\n"
            "assert 'triton' not in elogitnorm_fast.available_backends()\n"
            "assert 'triton' not in elogitnorm_fast.available_backends(op='logit_scores')\n"
            "reason = elogitnorm_fast.unavailable_reason('triton', op='logit_scores')\n"
            "assert reason == elogitnorm_fast.unavailable_reason('triton'), reason\n"
            "assert 'triton is not installed' in reason, reason\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (done.stdout, done.stderr) == ("", "")
