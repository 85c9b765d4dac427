import sys

from moe_viz.cli import main

sys.exit(main())
