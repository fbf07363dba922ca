import sys

from gptoss_tune.cli.main import main

sys.exit(main())
