"""Constants and small helpers of the dashboard tests (a plain module: tests/ has no packages)."""

from __future__ import annotations

from tiny_profile import MODEL, PROMPTS, STEPS  # noqa: F401  (re-exported for the tests)

TRIALS = 4
PAGES = ("runs", "sensitivity", "predictor", "temporal", "search", "policy", "gpus")


def app_path():
    """The installed dashboard/app.py (what `sixbit-tune dashboard` runs)."""
    from pathlib import Path

    import sixbit_tune.dashboard as dashboard

    return Path(dashboard.__file__).with_name("app.py")


def new_app():
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(app_path()), default_timeout=90)


def open_page(at, page: str):
    """Run the app on one st.navigation page (callable pages have no file for AppTest.switch_page: select the
    page's registered script hash, which is what a browser visiting /<page> does)."""
    if not at._registered_pages:
        at.run()
    url = "" if page == PAGES[0] else page
    hashes = [h for h, info in at._registered_pages.items() if info.get("url_pathname") == url]
    assert hashes, f"page {page!r} not registered: {at._registered_pages}"
    at._page_hash = hashes[0]
    return at.run()


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


H200 = {"name": "NVIDIA H200", "driver": "570.124.06", "memory_bytes": 150754820096, "compute_capability": "9.0",
        "uuid": "GPU-h200"}
H100 = {"name": "NVIDIA H100 80GB HBM3", "driver": "570.124.06", "memory_bytes": 85520809984,
        "compute_capability": "9.0", "uuid": "GPU-h100"}


def retarget(policy, gpu: dict):
    """The policy as if tuned on ``gpu`` (a :func:`sixbit_tune.store.env.gpu_info` dict): target GPU and compute
    capability replaced, everything else kept."""
    import dataclasses

    return policy.replace(target=dataclasses.replace(policy.target, gpu=gpu["name"],
                                                     compute_capability=gpu["compute_capability"]))


def label_gpu(path, gpu: dict) -> None:
    """Record, through the store's own writer, that a store's searches ran on ``gpu``: a run carrying the GPU's
    facts, and every trial and exported policy re-written with that GPU (their policies' target with it too; an
    exported policy file is re-saved). The measured figures are the CPU search's own."""
    import json
    import math

    from sixbit_tune import policy as P
    from sixbit_tune.store import Store

    def val(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    with Store.open(path) as s:
        w = s.writer("gpu-label")
        w.finish_run(w.begin_run("search", MODEL, gpu=gpu))
        for r in s.trials().to_dict("records"):
            pol = retarget(P.load(json.loads(r["policy"])), gpu).to_dict() if val(r["policy"]) else None
            w.write_trial(
                r["study"], int(r["number"]), state=r["state"],
                params=json.loads(r["params"]) if val(r["params"]) else None,
                quality=json.loads(r["quality"]) if val(r["quality"]) else None,
                **{k: val(r[k]) for k in ("latency_ms", "speedup", "peak_memory_bytes", "weight_bytes",
                                          "cache_bytes", "psnr_db", "ssim", "skip_share", "nvfp4_share",
                                          "fail_reason", "nvfp4_path", "kernel_path")},
                gpu=gpu["name"], policy=pol,
            )
        for r in s.policies().to_dict("records"):
            pol = retarget(P.load(json.loads(r["policy"])), gpu)
            w.write_policy(r["name"], pol.to_dict(), path=val(r["path"]), study=val(r["study"]),
                           trial=None if val(r["trial"]) is None else int(r["trial"]))
            if val(r["path"]):
                P.save(pol, r["path"])
