"""fastopt.verify on a user's model, and the demo end to end (one short epoch)."""

import pytest
import torch

import fastopt
from examples.demo import digits_spec
from fastopt.verify import verify
from optim_db import NAMES


def test_verify_passes_for_fastopt_and_reports_every_parameter():
    model, loss_fn, batches = digits_spec()
    report = verify(model, loss_fn, batches[:5], fastopt.AdamW, lr=1e-3, steps=8)
    assert report.ok, str(report)
    assert [p.name for p in report.params] == [n for n, _ in model.named_parameters()]
    assert len(report.losses) == 8 and report.max_loss_diff < 1e-5
    assert "within tolerance" in str(report)


class DriftingAdamW(fastopt.AdamW):
    """A broken optimizer: its lr is 1% off. verify must say so."""

    def __init__(self, params, lr=1e-3, **kwargs):
        super().__init__(params, lr=lr * 1.01, **kwargs)


DriftingAdamW.__name__ = "AdamW"


def test_verify_takes_any_reference_and_refuses_without_one():
    model, loss_fn, batches = digits_spec()
    import lion_pytorch

    report = verify(model, loss_fn, batches[:3], fastopt.Lion, lr=1e-3, steps=3,
                    reference=lion_pytorch.Lion)
    assert report.ok, str(report)
    with pytest.raises(ValueError, match="no torch.optim twin"):
        verify(model, loss_fn, batches[:3], fastopt.Lion, lr=1e-3, steps=3)


def test_verify_catches_a_wrong_optimizer():
    model, loss_fn, batches = digits_spec()
    report = verify(model, loss_fn, batches[:3], DriftingAdamW, lr=1e-3, steps=3)
    assert not report.ok
    assert any(not p.ok and p.max_abs > 1e-6 for p in report.params)
    assert "MISMATCH" in str(report)


def test_verify_dropout_models_see_the_same_masks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.5),
                                torch.nn.Linear(16, 2))
    batches = [(torch.randn(8, 6), torch.randint(0, 2, (8,))) for _ in range(3)]

    def loss_fn(net, batch):
        return torch.nn.functional.cross_entropy(net(batch[0]), batch[1])

    report = verify(model, loss_fn, batches, fastopt.SGD, lr=0.1, momentum=0.9, steps=6)
    assert report.ok, str(report)


def test_demo_runs_and_matches_torch(tmp_path, capsys):
    from examples.demo import main

    assert main(["--epochs", "1", "--optimizers", "Adam", "NAdam", "--results",
                 str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "adam.png").stat().st_size > 10_000
    rows = [line.split() for line in out.splitlines() if line.startswith("Adam ")][-3:]
    assert len(rows) == 3  # torch.optim, fastopt, torch.optim fused
    assert float(rows[1][-4]) < 1e-4, out  # max |dloss| from torch's run
    rows = [line.split() for line in out.splitlines() if line.startswith("NAdam ")][-2:]
    assert len(rows) == 2 and float(rows[1][-4]) < 1e-4, out


def test_the_demo_trains_every_optimizer():
    from examples.demo import SETTINGS

    assert set(NAMES) - {"AdamW8bit", "SAGA"} <= set(SETTINGS)
