"""benchmarks/check_linear.py's two rules really differ: "forward" takes forward mode, also on a convolutional
network above ``CHECK_ONESIDED_CONV_FROM_DIM`` parameters; "difference" is the library's rule."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

import mcmc_unlearner.unlearner as U
from mcmc_unlearner.models.bnn import LeNet5

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_forward_rule_takes_forward_mode_on_a_conv_net_and_difference_is_the_librarys() -> None:
    sys.path.insert(0, str(BENCH))  # the script imports _benchargs and model_matrix
    saved = (U.CHECK_DIFFERENCE_FROM_DIM, U.CHECK_ONESIDED_CONV_FROM_DIM, U.loop_over_draws)
    try:
        spec = importlib.util.spec_from_file_location("bench_check_linear", BENCH / "check_linear.py")
        cl = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cl)
        torch.manual_seed(0)
        model = LeNet5(1, 10, input_size=32)
        dim = sum(p.numel() for p in model.parameters())
        assert U.CHECK_ONESIDED_CONV_FROM_DIM <= dim < U.CHECK_DIFFERENCE_FROM_DIM
        library = U.check_linear_rule(model, dim)
        cl.use_rule("forward")
        assert U.check_linear_rule(model, dim) == "jvp"
        cl.use_rule("difference")
        assert U.check_linear_rule(model, dim) == library == "onesided"
        assert (U.CHECK_DIFFERENCE_FROM_DIM, U.CHECK_ONESIDED_CONV_FROM_DIM, U.loop_over_draws) == saved
    finally:
        U.CHECK_DIFFERENCE_FROM_DIM, U.CHECK_ONESIDED_CONV_FROM_DIM, U.loop_over_draws = saved
        sys.path.remove(str(BENCH))
