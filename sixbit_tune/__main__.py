import sys

from sixbit_tune.cli import main

sys.exit(main())
