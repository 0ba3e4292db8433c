"""Entry script of the Streamlit dashboard: ``streamlit run <this file> -- --store PATH [--store PATH2 ...]``.

Started by ``sixbit-tune dashboard``; the pages live in :mod:`sixbit_tune.dashboard.pages`.
"""

from sixbit_tune.dashboard.pages import main

main()
