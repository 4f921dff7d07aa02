"""The session's Slurm lab as a fixture; test modules import `slurm_lab` from here."""

from __future__ import annotations

import pytest
from slurmlab import SlurmLab, unavailable


@pytest.fixture(scope="session")
def slurm_lab(tmp_path_factory):
    """A started two-node Slurm on loopback (`n1`, `n2`); skips where Slurm is missing."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    lab = SlurmLab(tmp_path_factory.mktemp("slurmlab")).start()
    yield lab
    lab.stop()
