import sys

from explora.cli.main import main

sys.exit(main())
