import sys

from stepcache.cli.main import main

sys.exit(main())
