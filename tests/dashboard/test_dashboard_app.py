"""The Streamlit app under AppTest: every page against the real store (no exception, the expected charts and
tables), pages on stores that lack data (an st.info naming the command), export, several stores, data written
while the app runs."""

from __future__ import annotations

import json
import threading

import pytest
from dashboard_helpers import PAGES, TRIALS, new_app, open_page, texts
from sixbit_tune.dashboard import data

from sixbit_tune.store import Store

#: page -> (min Plotly charts, min dataframes)
EXPECTED = {
    "runs": (0, 1),
    "sensitivity": (2, 1),
    "predictor": (2, 1),
    "temporal": (3, 0),
    "search": (3, 1),
    "policy": (2, 2),
    "gpus": (1, 3),
}


def _clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, texts(at.error)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_on_the_real_store(page, dash_store, app_argv, tmp_path):
    app_argv(dash_store, policies_dir=tmp_path / "policies")
    at = open_page(new_app(), page)
    _clean(at)
    charts, frames = EXPECTED[page]
    assert len(at.get("plotly_chart")) >= charts
    assert len(at.dataframe) >= frames
    titles = [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")]
    assert all(titles), titles
    if page == "sensitivity":
        assert any("NVFP4" in t for t in titles) and any("INT8" in t for t in titles)
    if page == "search":
        assert "Importance source: optuna.importance on study" in texts(at.caption)
        assert {m.label for m in at.metric} >= {"trials", "completed", "feasible", "Pareto front"}
        assert [m.value for m in at.metric if m.label == "trials"] == [str(TRIALS)]
    if page == "policy":
        assert "stored no sample frames" in texts(at.info)
        assert at.text_input(key="pol_export_name").value.endswith(f"-trial{at.selectbox(key='pol_trial').value}")
    if page == "gpus":
        assert "One GPU in the opened store(s): CPU (no GPU)" in texts(at.info)


@pytest.mark.parametrize(
    "page, command",
    [("runs", "sixbit-tune profile"), ("sensitivity", "sixbit-tune profile"), ("predictor", "sixbit-tune profile"),
     ("temporal", "sixbit-tune profile"), ("search", "sixbit-tune search"), ("policy", "sixbit-tune search"),
     ("gpus", "sixbit-tune search")],
)
def test_pages_of_an_empty_store_say_which_command_fills_them(page, command, empty_store, app_argv):
    app_argv(empty_store)
    at = open_page(new_app(), page)
    _clean(at)
    assert command in texts(at.info)


@pytest.mark.parametrize("page, command", [("predictor", "sixbit-tune fit"), ("search", "sixbit-tune search"),
                                           ("policy", "sixbit-tune search")])
def test_pages_of_a_profile_only_store(page, command, profile_only_store, app_argv):
    app_argv(profile_only_store)
    at = open_page(new_app(), page)
    _clean(at)
    assert command in texts(at.info)


def test_missing_store_argument_is_an_error_not_an_exception(app_argv):
    app_argv()
    at = new_app().run()
    assert not at.exception
    assert "sixbit-tune dashboard --store PATH" in texts(at.error)


def test_a_store_folder_that_is_not_a_store(app_argv, tmp_path):
    app_argv(tmp_path / "nothing-here")
    at = new_app().run()
    assert not at.exception
    assert "no sixbit-tune store" in texts(at.error)


def test_export_from_the_policy_page(store_copy, app_argv, tmp_path):
    from sixbit_tune.runtime import load_policy

    policies = tmp_path / "policies"
    app_argv(store_copy, policies_dir=policies)
    at = open_page(new_app(), "policy")
    number = int(at.selectbox(key="pol_trial").value)
    at.text_input(key="pol_export_name").set_value("../escape").run()
    assert "path separator" in texts(at.error)
    assert not [b for b in at.button if b.key == "pol_export"]
    assert not (tmp_path / "escape.json").exists()
    at.text_input(key="pol_export_name").set_value("chosen").run()
    at.button(key="pol_export").click().run()
    _clean(at)
    path = policies / "chosen.json"
    assert f"wrote {path.resolve()}" in texts(at.success)
    (dl,) = at.download_button
    assert dl.label == "Download policy JSON"
    pol = load_policy(path)
    assert pol.provenance.trial == number
    with Store.open(store_copy, read_only=True) as s:
        assert s.policies()["name"].tolist() == ["chosen"]
    # the GPUs page now reports the exported policy as the store's choice
    at = open_page(at, "gpus")
    _clean(at)
    (box,) = [b for b in at.selectbox if b.key == "gpus_choice_0"]
    assert box.value == 0 and box.options[0] == f"exported chosen (store {store_copy.name})"
    assert "exported chosen" in [d.value for d in at.dataframe if "choice" in d.value.columns][0]["choice"].tolist()


def test_two_stores_side_by_side_and_store_choice(dash_store, second_store, app_argv):
    app_argv(dash_store, second_store)
    at = open_page(new_app(), "gpus")
    _clean(at)
    (table,) = [d.value for d in at.dataframe if "choice" in d.value.columns]
    assert table["store"].tolist() == ["h200", "b200"]
    assert table["choice"].notna().all()
    # both stores ran on the CPU: one "GPU", whose candidates come from both stores
    assert "One GPU in the opened store(s)" in texts(at.info)
    assert {o.split("(store ")[1].split(",")[0] for o in at.selectbox(key="gpus_choice_0").options} == {"h200", "b200"}
    at.sidebar.selectbox(key="store_label").set_value("b200").run()
    at = open_page(at, "search")
    _clean(at)
    assert len(at.get("plotly_chart")) >= 3


def test_new_trials_show_up_on_rerun(store_copy, app_argv):
    app_argv(store_copy)
    at = open_page(new_app(), "search")
    study = at.selectbox(key="search_study").value
    assert [m.value for m in at.metric if m.label == "trials"] == [str(TRIALS)]
    with Store.open(store_copy) as s:
        s.writer("late").write_trial(study, TRIALS, state="RUNNING", params={"tau": 0.1})
    at.run()
    _clean(at)
    assert [m.value for m in at.metric if m.label == "trials"] == [str(TRIALS + 1)]


def test_pages_stay_correct_while_a_writer_appends(store_copy, app_argv):
    """A profile-like writer adds block and layer parts while the app reruns its heaviest profile pages."""
    with Store.open(store_copy, read_only=True) as s:
        blocks = s.block_steps().drop(columns=["store"])
        layers = s.layer_steps().drop(columns=["store"])
        run = s.runs(kind="profile")["run_id"].iloc[0]
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with Store.open(store_copy) as s:
                w = s.writer("concurrent")
                rid = w.begin_run("profile", "tiny:wan")
                i = 0
                while not stop.is_set() and i < 40:
                    b = blocks[blocks["run_id"] == run].assign(run_id=rid, prompt_index=i)
                    w.write_block_steps(b)
                    w.write_layer_steps(layers[layers["run_id"] == run].assign(run_id=rid, prompt_index=i))
                    i += 1
                w.finish_run(rid)
        except BaseException as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=write)
    app_argv(store_copy)
    at = new_app()
    t.start()
    try:
        for page in ("runs", "sensitivity", "temporal", "predictor"):
            at = open_page(at, page)
            _clean(at)
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    at = open_page(at, "runs")
    runs = at.dataframe[0].value
    assert len(runs[runs["kind"] == "profile"]) == 2


def test_stored_sample_frames_are_shown(store_copy, app_argv):
    from PIL import Image

    with Store.open(store_copy, read_only=True) as s:
        t = data.study_trials(s, s.trials()["study"].iloc[0])
    first = t[t["state"] == "COMPLETE"].sort_values(["pareto", "latency_ms"], ascending=[False, True]).iloc[0]
    folder = store_copy / data.SAMPLES_DIR / first["study"] / str(int(first["number"]))
    folder.mkdir(parents=True)
    for name, colour in (("reference-0.png", (200, 30, 30)), ("policy-0.png", (190, 40, 30))):
        Image.new("RGB", (16, 16), colour).save(folder / name)
    app_argv(store_copy)
    at = open_page(new_app(), "policy")
    _clean(at)
    assert int(at.selectbox(key="pol_trial").value) == int(first["number"])
    assert len(at.get("imgs")) >= 1 or len(at.image) >= 1
    assert "stored no sample frames" not in texts(at.info)
