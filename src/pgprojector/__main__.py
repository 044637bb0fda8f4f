import sys

from pgprojector.cli import main

sys.exit(main())
