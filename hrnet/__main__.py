import sys

from hrnet.cli import main

sys.exit(main())
