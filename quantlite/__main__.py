import sys

from quantlite.cli import main

sys.exit(main())
