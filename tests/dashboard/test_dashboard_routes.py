"""The sensitivity page shows a layer × step map for every route the profile recorded (the derived W4A8 and FP8 routes
beside NVFP4 and INT8), and the format summary lists them."""

from __future__ import annotations

import json

from dashboard_helpers import new_app, open_page, texts
from sixbit_tune.dashboard import data
from sixbit_tune.dashboard.figures import FORMAT_LABEL

from sixbit_tune.routes import PROFILE_DEFAULT_ROUTES, PROFILE_ROUTES
from sixbit_tune.store import Store


def test_every_route_has_a_label():
    assert set(FORMAT_LABEL) == set(PROFILE_ROUTES)


def test_sensitivity_page_maps_every_recorded_route(profiled_tiny_store, app_argv, tmp_path):
    with Store.open(profiled_tiny_store, read_only=True) as store:
        run = store.runs(kind="profile")["run_id"].iloc[-1]
        summary = data.format_summary(store, run)
    assert sorted(summary["format"]) == sorted(PROFILE_DEFAULT_ROUTES)
    app_argv(profiled_tiny_store, policies_dir=tmp_path / "policies")
    at = open_page(new_app(), "sensitivity")
    assert not at.exception, [e.value for e in at.exception]
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    layer_maps = [t for t in titles if "relative output error (out_err)" in t]
    assert [t.split(" relative output error")[0] for t in layer_maps] == [FORMAT_LABEL[f] for f in PROFILE_DEFAULT_ROUTES]
    assert "No " not in texts(at.info)
