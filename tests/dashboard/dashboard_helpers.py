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
