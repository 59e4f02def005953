"""The options objects: BakeOptions (bake apply) and FitConfig (bake fit) are frozen, typed and
round-trip through JSON; a wrong key or type is one BakeError naming the field."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bake.errors import BakeError
from bake.fit.config import FitConfig
from bake.fit.lineas import LineasConfig
from bake.options import BakeOptions


def test_bake_options_round_trip_through_json():
    o = BakeOptions(dtype="float16", formats=["safetensors", "onnx"], prompts=["a", "b"], strength=2, link=False)
    assert o.formats == ("safetensors", "onnx") and o.strength == 2.0 and isinstance(o.strength, float)
    back = BakeOptions.from_dict(json.loads(json.dumps(o.to_dict())))
    assert back == o
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.dtype = "float32"


@pytest.mark.parametrize("data,field", [({"nope": 1}, "nope"), ({"max_new_tokens": "3"}, "max_new_tokens"),
                                        ({"formats": "onnx"}, "formats"), ({"version": 2}, "version"),
                                        ({"strength": True}, "strength"), ({"force": 1}, "force")])
def test_bake_options_name_the_bad_field(data, field):
    with pytest.raises(BakeError, match=field):
        BakeOptions.from_dict(data)


def test_bake_options_check_refuses_what_cannot_be_written():
    with pytest.raises(BakeError, match="--dtype bfloat16: not with --format onnx"):
        BakeOptions(dtype="bfloat16", formats=("onnx",)).check()
    with pytest.raises(BakeError, match="--stream: writes safetensors in the stored dtypes only"):
        BakeOptions(stream=True, dtype="float16").check()
    with pytest.raises(BakeError, match="--onnx-layout"):
        BakeOptions(onnx_layout="flat").check()
    assert BakeOptions().simple and not BakeOptions(insert_modules=True).simple


def test_fit_config_round_trips_with_nested_lineas():
    c = FitConfig("lineas", "post-norms,mlp-out", strength=0.5, lineas=LineasConfig(steps=7))
    assert c.sites == ("post-norms", "mlp-out")
    back = FitConfig.from_dict(json.loads(json.dumps(c.to_dict())))
    assert back == c and back.lineas.steps == 7


@pytest.mark.parametrize("data,field", [({"method": "ablate", "knots": "4"}, "knots"), ({"sites": ["x"]}, "method"),
                                        ({"method": "ablate", "lineas": {"steps": "5"}}, "lineas.steps"),
                                        ({"method": "ablate", "colour": 1}, "colour")])
def test_fit_config_names_the_bad_field(data, field):
    with pytest.raises(BakeError, match=field):
        FitConfig.from_dict(data)
