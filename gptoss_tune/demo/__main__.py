import sys

from gptoss_tune.demo.steps import main

sys.exit(main())
