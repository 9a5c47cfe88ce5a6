"""The step-load report names the first step whose throughput is within 5% of the best."""

import csv
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "loadtests"))
import saturation

pytestmark = pytest.mark.timing  # latency or windows under load: make test-noisy runs these beside a busy core


def test_saturation_is_the_first_step_near_the_best(tmp_path, capsys):
    path = tmp_path / "h.csv"
    fields = ["Timestamp", "User Count", "Type", "Name", "Requests/s", "95%"]
    rates = {0: [0], 8: [90, 100, 100], 16: [150, 190, 200], 24: [200, 205, 206], 32: [190, 210, 209]}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for users, rs in rates.items():
            for r in rs:
                w.writerow(
                    {
                        "Timestamp": 0,
                        "User Count": users,
                        "Type": "",
                        "Name": "Aggregated",
                        "Requests/s": r,
                        "95%": "N/A" if users == 0 else 10 * users,
                    }
                )
            w.writerow({"Timestamp": 0, "User Count": users, "Type": "POST", "Name": "/x", "Requests/s": 1, "95%": 1})
    assert saturation.main(str(path)) == 0
    assert "saturation: 24 users" in capsys.readouterr().out
    assert 0 not in saturation.steps(str(path))
