import sys

from atelier3d.cli import main

sys.exit(main())
