"""The segment options are declared once (slip.options): both CLIs, the job payload, the library config and
the resolver are built from that one declaration, with the same names, defaults, help and checks."""

from __future__ import annotations

import click
import pytest
import typer
from typer.testing import CliRunner

from slip.config import SlipConfig
from slip.errors import ConfigError
from slip.options import SegmentOptions, with_segment_options


def _click_params(command) -> dict[str, click.Parameter]:
    app = typer.Typer()
    app.command()(command)
    return {p.name: p for p in typer.main.get_command(app).params}


def _library_segment():
    from slip.cli.segment import segment

    return _click_params(segment)


def _queue_segment():
    from producer.queue_cli import submit_segment

    return _click_params(submit_segment)


def test_every_declared_option_is_an_option_of_slip_segment_with_its_help_and_default():
    params = _library_segment()
    for name, field in SegmentOptions.model_fields.items():
        assert name in params, f"slip segment lacks --{name}"
        assert params[name].help == field.description
        if name not in ("render", "threshold"):  # render: slip segment writes PNGs by default
            assert params[name].default == field.default, name
    assert params["render"].default is True


def test_slip_submit_segment_takes_the_same_options():
    library, queue = _library_segment(), _queue_segment()
    declared = set(SegmentOptions.model_fields)
    assert declared <= set(queue), f"slip submit segment lacks {sorted(declared - set(queue))}"
    for name in declared:
        assert queue[name].opts == library[name].opts and queue[name].help == library[name].help, name
        assert queue[name].secondary_opts == library[name].secondary_opts, name


def test_the_command_receives_one_validated_options_value():
    seen = {}

    @with_segment_options()
    def command(label: str = typer.Option("x"), options: SegmentOptions = SegmentOptions()) -> None:
        seen["options"], seen["label"] = options, label

    app = typer.Typer()
    app.command()(command)
    result = CliRunner().invoke(app, ["--label", "y", "--points-per-side", "8", "--threshold", "0.2",
                                                    "--threshold", "0.3", "--no-square", "--instances", "all"])
    assert result.exit_code == 0, result.output
    assert seen["label"] == "y"
    assert seen["options"] == SegmentOptions(points_per_side=8, threshold=(0.2, 0.3), square=False, instances="all")
    bad = CliRunner().invoke(app, ["--instances", "some"])
    assert bad.exit_code == 2
    assert bad.output.strip().splitlines() == [
        "error: invalid SegmentOptions: instances: Input should be 'one' or 'all'"]


@pytest.mark.parametrize("raw, words", [
    ({"points_per_side": 0}, "points_per_side: Input should be greater than or equal to 1"),
    ({"box_nms_thresh": 1.5}, "box_nms_thresh"),
    ({"filters": "containment,sideways"}, "unknown filter 'sideways'"),
    ({"threshold": [0.2, 1.5]}, "cosine similarity"),
    ({"crop_background": "pink"}, "crop_background"),
    ({"top_k": -1}, "top_k"),
    ({"colour": "red"}, "colour: Extra inputs are not permitted"),
])
def test_a_bad_option_is_one_line_naming_it(raw, words):
    with pytest.raises(ConfigError, match=words) as info:
        SegmentOptions.parse(raw)
    assert "\n" not in str(info.value)


def test_the_job_payload_is_the_declaration_round_tripped_through_json():
    import json

    options = SegmentOptions(points_per_side=16, filters="containment:0.8", threshold=(0.2, None), instances="all",
                             render=True)
    payload = json.loads(json.dumps(options.model_dump(mode="json")))
    assert SegmentOptions.parse(payload) == options
    assert SegmentOptions.parse({"threshold": [0.4]}).threshold == 0.4  # a list of one is one value


def test_the_library_config_routes_each_name_to_the_half_that_declares_it():
    config = SlipConfig.of(sam="synth", device="cpu", points_per_side=8, instances="all")
    assert (config.models.sam, config.models.device) == ("synth", "cpu")
    assert (config.options.points_per_side, config.options.instances) == (8, "all")
    with pytest.raises(ConfigError, match="no_such_option"):
        SlipConfig.of(no_such_option=1)


def test_explicit_generator_options_are_what_the_resolver_merges():
    options = SegmentOptions(points_per_side=8, min_mask_region_area=25)
    assert options.generator_overrides() == {"points_per_side": 8, "min_mask_region_area": 25}
    assert SegmentOptions().generator_overrides() == {}
    with pytest.raises(ConfigError, match="2 thresholds for 3 prompts"):
        SegmentOptions(threshold=(0.1, 0.2)).check_prompts(3)
