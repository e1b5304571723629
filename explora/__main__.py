import sys

from explora.cli import main

sys.exit(main())
