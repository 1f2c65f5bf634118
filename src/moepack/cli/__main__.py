import sys

from moepack.cli import main

sys.exit(main())
