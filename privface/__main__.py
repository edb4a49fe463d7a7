"""`python -m privface ...`: the same as the installed `privface` command (the local stack and the tests
start every process this way, so they run this checkout's code)."""
import sys

from privface.cli import main

sys.exit(main())
