"""engine/loss_window.py: the one device-side loss window both training step paths read."""
import torch

from engine.graphed_step import StaticStepRunner
from engine.loss_window import LossWindow
from engine.supervised_step import SupervisedStep


def _t(x):
    return torch.tensor(x)


def test_window_means_over_finite_steps_and_first_nonfinite_step():
    window = LossWindow(torch.device("cpu"))
    window.add(_t(1.0), {"cls_loss": _t(0.5)}, _t(False), _t(True), _t(10))
    window.add(_t(float("nan")), {"cls_loss": _t(float("nan"))}, _t(True), _t(False), _t(11))
    window.add(_t(2.0), {"cls_loss": _t(1.5)}, _t(True), _t(True), _t(12))   # finite loss, bad gradient
    window.add(_t(3.0), {"cls_loss": _t(2.5)}, _t(False), _t(True), _t(13))
    report = window.read()
    assert (report.steps, report.means, report.nonfinite) == (2, {"loss": 2.0, "cls_loss": 1.5}, 2)
    assert (report.first_step, report.first_what) == (11, "loss")
    window.add(_t(4.0), {"cls_loss": _t(1.0)})   # a step known finite (the host check)
    again = window.read(world_size=1)
    assert (again.steps, again.means, again.nonfinite, again.first_step) == (1, {"loss": 4.0, "cls_loss": 1.0}, 0,
                                                                              None)


def test_window_names_a_gradient_when_the_first_bad_step_had_a_finite_loss():
    window = LossWindow(torch.device("cpu"))
    window.add(_t(2.0), {}, _t(True), _t(True), _t(5))
    assert (window.read().first_what, window.read().steps) == ("gradient", 0)


def test_both_step_paths_keep_their_losses_in_one_window_class():
    for step_class in (SupervisedStep, StaticStepRunner):
        assert "LossWindow" in step_class.__init__.__code__.co_names
