"""The model settings are declared and validated once (slip.settings): a flag > its SLIP_* variable > the
default; a process reads only the variables it uses; every error names the flag and the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from slip.errors import ConfigError
from slip.settings import ENV, ModelSettings


def test_defaults_then_the_environment_then_flags():
    assert ModelSettings.from_env({}) == ModelSettings()
    env = {"SLIP_SAM": "synth", "SLIP_CLIP": "synth", "SLIP_DEVICE": "cpu", "SLIP_DTYPE": "bf16",
           "SLIP_THREADS": "2", "SLIP_CACHE": "~/weights", "SLIP_POINTS_PER_BATCH": "16", "SLIP_BATCH_SIZE": "8",
           "SLIP_LOG_LEVEL": "debug", "SLIP_ENGINE": "slip"}
    settings = ModelSettings.from_env(env)
    assert (settings.sam, settings.clip, settings.device, settings.dtype) == ("synth", "synth", "cpu", "bf16")
    assert (settings.threads, settings.points_per_batch, settings.batch_size) == (2, 16, 8)
    assert settings.cache_dir == Path("~/weights").expanduser() and settings.log_level == "DEBUG"
    flagged = ModelSettings.from_env(env, sam="vit_b", device=None)
    assert (flagged.sam, flagged.device) == ("vit_b", "cpu")  # a flag wins; None = not given


def test_only_the_variables_a_command_uses_are_read():
    broken = {"SLIP_DEVICE": "gpu", "SLIP_THREADS": "many", "SLIP_SAM": "synth"}
    assert ModelSettings.from_env(broken, ("sam",)).sam == "synth"
    with pytest.raises(ConfigError, match="SLIP_DEVICE"):
        ModelSettings.from_env(broken, ("sam", "device"))
    # a flag given on the command line means its variable is not read at all
    assert ModelSettings.from_env(broken, ("sam", "device"), device="cpu").device == "cpu"


@pytest.mark.parametrize("env, words", [
    ({"SLIP_DEVICE": "gpu"}, "--device / SLIP_DEVICE='gpu' is invalid: expected auto | cpu | cuda | cuda:N | mps"),
    ({"SLIP_DTYPE": "fp8"}, "--dtype / SLIP_DTYPE='fp8' is invalid"),
    ({"SLIP_ENGINE": "sam9"}, "--engine / SLIP_ENGINE='sam9' is invalid: expected slip | sam3 | sam3-rank"),
    ({"SLIP_THREADS": "0"}, "SLIP_THREADS='0' must be at least 1"),
    ({"SLIP_BATCH_SIZE": "lots"}, "SLIP_BATCH_SIZE='lots' is not a valid int"),
    ({"SLIP_LOG_LEVEL": "LOUD"}, "SLIP_LOG_LEVEL='LOUD' is invalid"),
])
def test_a_bad_value_is_one_line_naming_the_flag_and_the_variable(env, words):
    with pytest.raises(ConfigError) as info:
        ModelSettings.from_env(env)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_bad_flag_names_itself_too():
    with pytest.raises(ConfigError, match="--device / SLIP_DEVICE='tpu' is invalid"):
        ModelSettings.from_env({}, device="tpu")


def test_every_field_has_a_variable():
    from dataclasses import fields

    assert {f.name for f in fields(ModelSettings)} == set(ENV)
    assert all(name.startswith("SLIP_") for name in ENV.values())
