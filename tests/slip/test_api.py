"""The package's public names resolve, and a wrong name fails like any missing attribute."""

import pytest

import slip


@pytest.mark.parametrize("name", slip.__all__)
def test_every_export_resolves(name):
    assert getattr(slip, name).__name__ == name


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        slip.nope  # noqa: B018


def test_requests_and_job_payloads_import_no_model_code():
    """slip.request, slip.options and the job model are read by producers and light CLI commands: no torch."""
    import subprocess
    import sys

    code = ("import sys, slip.request, slip.options, slip.settings, jobs.model, jobs.ledger, jobs.view, producer.cli; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'segment_anything') if m in sys.modules); "
            "print(','.join(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported {done.stdout.strip()}"
