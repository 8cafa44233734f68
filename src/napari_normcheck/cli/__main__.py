"""``python -m napari_normcheck.cli``."""

import sys

from napari_normcheck.cli import main

sys.exit(main())
