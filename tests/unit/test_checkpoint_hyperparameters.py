"""What MlflowTracking's checkpoint files keep of a module's hyperparameters: each row a value
and whether it stays (a weights-only load takes it) or is left out with its repr."""

from __future__ import annotations

import functools
import io
from collections import OrderedDict

import pytest
import torch
from lightning.fabric.utilities.data import AttributeDict
from torch import nn

from dlharness.tracking.checkpointing.background_io import (
    LEFT_OUT_HPARAMS_KEY,
    with_plain_hyperparameters,
)

CASES = [
    # (value, kept as)
    (0.01, 0.01),
    ("adam", "adam"),
    (None, None),
    (True, True),
    ([16, 32], [16, 32]),
    ((3, 32, 32), (3, 32, 32)),
    ({"lr": 0.1, "betas": (0.9, 0.99)}, {"lr": 0.1, "betas": (0.9, 0.99)}),
    (OrderedDict(a=1), {"a": 1}),
    (AttributeDict(width=8), {"width": 8}),
    (torch.float16, torch.float16),
    (torch.device("cpu"), torch.device("cpu")),
]
LEFT_OUT = [
    functools.partial(torch.optim.Adam, lr=0.01),
    nn.Linear(2, 2),
    torch.optim.SGD,
    {"optimizer": functools.partial(torch.optim.SGD, lr=1)},
    [nn.ReLU()],
    {1.5: "a float key"},
]


def weights_only_round_trip(checkpoint: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(("value", "kept"), CASES)
def test_plain_values_stay_and_load_weights_only(value, kept):
    checkpoint = {"hyper_parameters": AttributeDict(value=value), "state_dict": {}}
    loaded = weights_only_round_trip(with_plain_hyperparameters(checkpoint))
    assert loaded["hyper_parameters"] == {"value": kept}
    assert LEFT_OUT_HPARAMS_KEY not in loaded


@pytest.mark.parametrize("value", LEFT_OUT)
def test_objects_are_left_out_with_their_repr_and_the_rest_stays(value):
    checkpoint = {
        "hyper_parameters": {"thing": value, "lr": 0.1},
        "datamodule_hyper_parameters": {"batch_size": 8, "thing": value},
        "hparams_type": "a type a weights-only load refuses",
    }
    loaded = weights_only_round_trip(with_plain_hyperparameters(checkpoint))
    assert loaded["hyper_parameters"] == {"lr": 0.1}
    assert loaded["datamodule_hyper_parameters"] == {"batch_size": 8}
    assert "hparams_type" not in loaded
    assert loaded[LEFT_OUT_HPARAMS_KEY] == {
        "hyper_parameters.thing": repr(value)[:1000],
        "datamodule_hyper_parameters.thing": repr(value)[:1000],
    }


def test_a_checkpoint_without_hyperparameters_is_left_as_it_is():
    checkpoint = {"state_dict": {"w": torch.ones(2)}, "epoch": 3}
    assert with_plain_hyperparameters(checkpoint) == checkpoint
